// Ogg pages for Opus (RFC 3533 + RFC 7845): a muxer for the microphone stream and a demuxer for
// the server's stream. No dependencies.

// CRC-32 as Ogg uses it: polynomial 0x04c11db7, not reflected, initial value 0, no final xor.
const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let k = 0; k < 8; k++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    t[i] = r >>> 0;
  }
  return t;
})();

export function oggCrc(bytes) {
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  return crc;
}

const FLAG_CONTINUED = 1, FLAG_BOS = 2, FLAG_EOS = 4;
const CAPTURE = [0x4f, 0x67, 0x67, 0x53]; // "OggS"

/** One Ogg page holding `packets` (Uint8Array[]); the last packet ends on this page. */
export function buildPage(packets, { granule, serial, sequence, flags = 0 }) {
  const lacing = [];
  for (const p of packets) {
    for (let n = p.length; ; n -= 255) {
      lacing.push(Math.min(n, 255));
      if (n < 255) break;
    }
  }
  if (lacing.length > 255) throw new Error(`Ogg page too large (${lacing.length} segments)`);
  const bodyLength = packets.reduce((s, p) => s + p.length, 0);
  const page = new Uint8Array(27 + lacing.length + bodyLength);
  const view = new DataView(page.buffer);
  page.set(CAPTURE, 0);
  page[4] = 0; // version
  page[5] = flags;
  view.setBigInt64(6, BigInt(granule), true);
  view.setUint32(14, serial >>> 0, true);
  view.setUint32(18, sequence >>> 0, true);
  // bytes 22..25: CRC, computed with the field zeroed
  page[26] = lacing.length;
  page.set(lacing, 27);
  let offset = 27 + lacing.length;
  for (const p of packets) {
    page.set(p, offset);
    offset += p.length;
  }
  view.setUint32(22, oggCrc(page), true);
  return page;
}

/** The OpusHead identification header (RFC 7845 §5.1), mono, channel mapping family 0. */
export function opusHead({ channels = 1, preSkip = 312, inputSampleRate = 24000 } = {}) {
  const h = new Uint8Array(19);
  const v = new DataView(h.buffer);
  h.set(new TextEncoder().encode("OpusHead"), 0);
  h[8] = 1; // version
  h[9] = channels;
  v.setUint16(10, preSkip, true);
  v.setUint32(12, inputSampleRate, true);
  v.setInt16(16, 0, true); // output gain
  h[18] = 0; // mapping family
  return h;
}

/** The OpusTags comment header (RFC 7845 §5.2) with no user comments. */
export function opusTags(vendor = "moshi-ttt web client") {
  const vend = new TextEncoder().encode(vendor);
  const h = new Uint8Array(8 + 4 + vend.length + 4);
  const v = new DataView(h.buffer);
  h.set(new TextEncoder().encode("OpusTags"), 0);
  v.setUint32(8, vend.length, true);
  h.set(vend, 12);
  v.setUint32(12 + vend.length, 0, true);
  return h;
}

/**
 * Muxes Opus packets into Ogg pages: first the OpusHead page (BOS) and the OpusTags page, then data
 * pages of `packetsPerPage` packets. Granule positions count 48 kHz samples, as Opus requires.
 */
export class OggOpusMuxer {
  constructor({ packetsPerPage = 2, preSkip = 312, inputSampleRate = 24000 } = {}) {
    this.packetsPerPage = packetsPerPage;
    this.preSkip = preSkip;
    this.inputSampleRate = inputSampleRate;
    this.serial = (Math.random() * 0xffffffff) >>> 0;
    this.sequence = 0;
    this.granule = 0;
    this.pending = [];
    this.started = false;
  }

  #page(packets, flags = 0) {
    return buildPage(packets, { granule: this.granule, serial: this.serial, sequence: this.sequence++, flags });
  }

  /** The two header pages; `addPacket` returns them before the first data page if not taken before. */
  headerPages() {
    this.started = true;
    return [
      this.#page([opusHead({ preSkip: this.preSkip, inputSampleRate: this.inputSampleRate })], FLAG_BOS),
      this.#page([opusTags()]),
    ];
  }

  /** Adds one Opus packet lasting `samples48k` samples at 48 kHz; returns the finished pages (maybe none). */
  addPacket(packet, samples48k = 960) {
    const pages = this.started ? [] : this.headerPages();
    this.pending.push(packet);
    this.granule += samples48k;
    if (this.pending.length >= this.packetsPerPage) pages.push(this.flush());
    return pages;
  }

  /** A page with the packets not yet paged (`eos` marks the end of the stream), or null if none. */
  flush(eos = false) {
    if (!this.pending.length && !eos) return null;
    const page = this.#page(this.pending, eos ? FLAG_EOS : 0);
    this.pending = [];
    return page;
  }
}

/**
 * Demuxes an Ogg byte stream (fed in arbitrary pieces) into packets, joining packets continued across
 * pages. `push(bytes)` returns [{packet, granule, pageIndex}] for the packets completed by these bytes.
 */
export class OggDemuxer {
  constructor() {
    this.buffer = new Uint8Array(0);
    this.partial = []; // pieces of a packet continued on the next page
    this.pages = 0;
    this.badPages = 0;
  }

  push(bytes) {
    const joined = new Uint8Array(this.buffer.length + bytes.length);
    joined.set(this.buffer, 0);
    joined.set(bytes, this.buffer.length);
    const out = [];
    let pos = 0;
    while (true) {
      const start = findCapture(joined, pos);
      if (start < 0) {
        pos = Math.max(pos, joined.length - 3); // keep a possible partial "OggS"
        break;
      }
      if (joined.length - start < 27) { pos = start; break; }
      const nSeg = joined[start + 26];
      const headerLength = 27 + nSeg;
      if (joined.length - start < headerLength) { pos = start; break; }
      const lacing = joined.subarray(start + 27, start + headerLength);
      const bodyLength = lacing.reduce((s, x) => s + x, 0);
      if (joined.length - start < headerLength + bodyLength) { pos = start; break; }
      const page = joined.slice(start, start + headerLength + bodyLength);
      pos = start + headerLength + bodyLength;
      const stored = new DataView(page.buffer).getUint32(22, true);
      page.fill(0, 22, 26);
      if (oggCrc(page) !== stored) {
        this.badPages++;
        this.partial = [];
        pos = start + 1; // resynchronise on the next capture pattern
        continue;
      }
      out.push(...this.#packets(page, lacing, headerLength));
      this.pages++;
    }
    this.buffer = joined.slice(pos);
    return out;
  }

  #packets(page, lacing, headerLength) {
    const view = new DataView(page.buffer);
    const flags = page[5];
    const granule = Number(view.getBigInt64(6, true));
    // A continued page whose start we never saw (or a fresh page after an unfinished one): drop the piece.
    let orphan = Boolean(flags & FLAG_CONTINUED) && this.partial.length === 0;
    if (!(flags & FLAG_CONTINUED)) this.partial = [];
    const out = [];
    let offset = headerLength;
    let pieces = this.partial;
    for (const len of lacing) {
      pieces.push(page.subarray(offset, offset + len));
      offset += len;
      if (len < 255) {
        if (!orphan) out.push({ packet: concat(pieces), granule, pageIndex: this.pages });
        orphan = false;
        pieces = [];
      }
    }
    this.partial = pieces;
    return out;
  }
}

function findCapture(bytes, from) {
  for (let i = from; i + 3 < bytes.length; i++) {
    if (bytes[i] === 0x4f && bytes[i + 1] === 0x67 && bytes[i + 2] === 0x67 && bytes[i + 3] === 0x53) return i;
  }
  return -1;
}

function concat(pieces) {
  if (pieces.length === 1) return pieces[0].slice();
  const out = new Uint8Array(pieces.reduce((s, p) => s + p.length, 0));
  let o = 0;
  for (const p of pieces) { out.set(p, o); o += p.length; }
  return out;
}

export function isOpusHead(packet) {
  return packet.length >= 19 && new TextDecoder().decode(packet.subarray(0, 8)) === "OpusHead";
}

export function isOpusTags(packet) {
  return packet.length >= 8 && new TextDecoder().decode(packet.subarray(0, 8)) === "OpusTags";
}
