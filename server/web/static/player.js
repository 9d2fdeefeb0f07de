// Server audio: Ogg pages → Opus packets → WebCodecs AudioDecoder → the jitter-buffer worklet.

import { OggDemuxer, isOpusHead, isOpusTags } from "./ogg.js";
import { SAMPLE_RATE } from "./mic.js";

export class Player {
  constructor(ctx, { onError = () => {}, prebufferMs = 160 } = {}) {
    this.ctx = ctx;
    this.onError = onError;
    this.demuxer = new OggDemuxer();
    this.decoder = null;
    this.timestamp = 0;
    this.packets = 0;
    this.decodedSamples = 0;
    this.decodedRate = SAMPLE_RATE;
    this.jitter = { underruns: 0, droppedSamples: 0, bufferedMs: 0, playing: false };
    this.node = new AudioWorkletNode(ctx, "moshi-playback", {
      numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1],
      processorOptions: { prebufferMs, maxBufferMs: 800 },
    });
    this.node.port.onmessage = (e) => { this.jitter = e.data; };
    this.node.connect(ctx.destination);
  }

  get pages() {
    return this.demuxer.pages;
  }

  /** Feeds one 0x01 payload (Ogg bytes: whole pages, or pieces of them). */
  push(bytes) {
    for (const { packet } of this.demuxer.push(bytes)) {
      if (isOpusHead(packet)) this.#configure(packet);
      else if (isOpusTags(packet)) continue;
      else this.#decode(packet);
    }
  }

  #configure(head) {
    if (this.decoder && this.decoder.state !== "closed") this.decoder.close();
    this.decoder = new AudioDecoder({
      output: (data) => this.#play(data),
      error: (e) => this.onError(`audio decoder: ${e.message || e}`),
    });
    this.decoder.configure({ codec: "opus", sampleRate: SAMPLE_RATE, numberOfChannels: 1, description: head });
  }

  #decode(packet) {
    if (!this.decoder) this.#configure(undefined); // no OpusHead seen: decoder defaults
    if (this.decoder.state !== "configured") return;
    this.packets++;
    this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: this.timestamp, data: packet }));
    this.timestamp += 20000; // informative only: playback is paced by the worklet
  }

  #play(data) {
    // Decoders may output at 48 kHz whatever was asked: the worklet resamples from data.sampleRate.
    const opts = { planeIndex: 0, format: "f32-planar" };
    const samples = new Float32Array(data.allocationSize(opts) / 4);
    data.copyTo(samples, opts);
    this.decodedRate = data.sampleRate;
    this.decodedSamples += data.numberOfFrames;
    // Test hook: a page script (or a test) that sets window.moshiRecord = [] gets a copy of every decoded block.
    globalThis.moshiRecord?.push({ sampleRate: data.sampleRate, samples: samples.slice() });
    this.node.port.postMessage({ samples, sampleRate: data.sampleRate }, [samples.buffer]);
    data.close();
  }

  /** Seconds of decoded audio received so far. */
  get decodedSeconds() {
    return this.decodedSamples / this.decodedRate;
  }

  close() {
    if (this.decoder && this.decoder.state !== "closed") this.decoder.close();
    this.node.port.onmessage = null;
    this.node.disconnect();
    this.decoder = null;
  }
}
