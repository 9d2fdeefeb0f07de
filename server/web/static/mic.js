// Microphone (or an audio file played as one) → 24 kHz mono → WebCodecs Opus (20 ms packets) → Ogg pages of
// 2 packets.

import { OggOpusMuxer } from "./ogg.js";

export const SAMPLE_RATE = 24000;
const FRAME_MS = 20;
const FRAME = (SAMPLE_RATE * FRAME_MS) / 1000; // 480 samples

export class Microphone {
  /** `onPage(bytes)` gets each Ogg page (the two header pages first); `onLevel(rms)` each 20 ms frame. */
  constructor({ onPage, onLevel = () => {}, onError = () => {} }) {
    this.onPage = onPage;
    this.onLevel = onLevel;
    this.onError = onError;
    this.sending = false;
    this.packets = 0;
    this.pages = 0;
    this.timestamp = 0;
  }

  /** Wires the capture node to the microphone (permission prompt), or, given `file` (a decoded AudioBuffer), to
   * that file: it plays once from `start()`, in real time, heard on the speakers too, then silence follows (the
   * conversation goes on until it is ended). Nothing is sent yet. */
  async open(ctx, file = null) {
    this.ctx = ctx;
    this.node = new AudioWorkletNode(ctx, "moshi-capture", {
      numberOfInputs: 1, numberOfOutputs: 0, channelCount: 1, channelCountMode: "explicit",
      processorOptions: { targetRate: SAMPLE_RATE, frameSize: FRAME },
    });
    this.node.port.onmessage = (e) => this.#frame(e.data);
    if (file) {
      this.fileEnded = false;
      this.source = new AudioBufferSourceNode(ctx, { buffer: file });
      this.source.onended = () => { this.fileEnded = true; };
      this.source.connect(ctx.destination);
      this.silence = new ConstantSourceNode(ctx, { offset: 0 }); // keeps frames coming before and after the file
      this.silence.connect(this.node);
      this.silence.start();
    } else {
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
      this.source = ctx.createMediaStreamSource(this.stream);
    }
    this.source.connect(this.node);
    this.muxer = new OggOpusMuxer({ packetsPerPage: 2, inputSampleRate: SAMPLE_RATE });
    this.encoder = new AudioEncoder({
      output: (chunk) => this.#packet(chunk),
      error: (e) => this.onError(`audio encoder: ${e.message || e}`),
    });
    this.encoder.configure({
      codec: "opus", sampleRate: SAMPLE_RATE, numberOfChannels: 1, bitrate: 32000,
      opus: { format: "opus", frameDuration: FRAME_MS * 1000, application: "voip" },
    });
  }

  /** Starts encoding and sending (call once the server's handshake arrived), and the file, if it is one. */
  start() {
    this.sending = true;
    if (this.source instanceof AudioBufferSourceNode && !this.started) this.source.start();
    this.started = true;
  }

  #frame({ pcm, rms }) {
    this.onLevel(rms);
    if (!this.sending || !this.encoder || this.encoder.state !== "configured") return;
    const data = new AudioData({
      format: "f32-planar", sampleRate: SAMPLE_RATE, numberOfFrames: pcm.length, numberOfChannels: 1,
      timestamp: this.timestamp, data: pcm,
    });
    this.timestamp += (1e6 * pcm.length) / SAMPLE_RATE;
    this.encoder.encode(data);
    data.close();
  }

  #packet(chunk) {
    const bytes = new Uint8Array(chunk.byteLength);
    chunk.copyTo(bytes);
    const samples48k = chunk.duration ? Math.round((chunk.duration * 48000) / 1e6) : 960;
    this.packets++;
    for (const page of this.muxer.addPacket(bytes, samples48k)) {
      this.pages++;
      this.onPage(page);
    }
  }

  close() {
    this.sending = false;
    if (this.node) {
      this.node.port.postMessage("stop");
      this.node.port.onmessage = null;
    }
    if (this.source) this.source.onended = null;
    this.source?.disconnect();
    this.silence?.disconnect();
    this.stream?.getTracks().forEach((t) => t.stop());
    if (this.encoder && this.encoder.state !== "closed") this.encoder.close();
    this.encoder = this.node = this.source = this.stream = this.silence = null;
  }
}
