// AudioWorklet processors (loaded with audioWorklet.addModule): microphone capture and playback.
// `sampleRate` is the AudioContext's rate (a global of AudioWorkletGlobalScope).

/**
 * Microphone → fixed-size frames at `targetRate` (linear resampling if the context runs at another
 * rate). Posts {pcm: Float32Array(frameSize), rms} per frame. No outputs: an automatic pull node.
 */
class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRate = 24000, frameSize = 480 } = options.processorOptions || {};
    this.step = sampleRate / targetRate; // source samples per output sample
    this.frameSize = frameSize;
    this.frame = new Float32Array(frameSize);
    this.filled = 0;
    this.pos = 0; // fractional read position in the current input block (resampling)
    this.prev = 0; // last sample of the previous block (interpolation across blocks)
    this.running = true;
    this.port.onmessage = (e) => { if (e.data === "stop") this.running = false; };
  }

  push(x) {
    this.frame[this.filled++] = x;
    if (this.filled === this.frameSize) {
      let sum = 0;
      for (const v of this.frame) sum += v * v;
      const pcm = this.frame;
      this.port.postMessage({ pcm, rms: Math.sqrt(sum / pcm.length) }, [pcm.buffer]);
      this.frame = new Float32Array(this.frameSize);
      this.filled = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!this.running) return false;
    if (!input || input.length === 0) return true;
    const x = input[0];
    if (this.step === 1) {
      for (let i = 0; i < x.length; i++) this.push(x[i]);
      return true;
    }
    // Linear interpolation; position -1 is the previous block's last sample.
    while (this.pos < x.length - 1) {
      const i = Math.floor(this.pos), f = this.pos - i;
      const a = i < 0 ? this.prev : x[i];
      this.push(a + (x[i + 1] - a) * f);
      this.pos += this.step;
    }
    this.pos -= x.length;
    this.prev = x[x.length - 1];
    return true;
  }
}

/**
 * A jitter buffer: plays the PCM it is sent ({samples, sampleRate}; any rate, resampled linearly to
 * the context's) without gaps. Starts (and restarts after running dry) once `prebufferMs` are buffered;
 * drops the oldest audio when more than `maxBufferMs` pile up (bounded latency). Posts stats.
 */
class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { prebufferMs = 160, maxBufferMs = 800 } = options.processorOptions || {};
    this.prebufferMs = prebufferMs;
    this.maxBufferMs = maxBufferMs;
    this.srcRate = sampleRate;
    this.ring = new Float32Array(sampleRate * 20);
    this.written = 0; // samples written in total
    this.read = 0; // fractional read position (same scale)
    this.playing = false;
    this.stats = { underruns: 0, droppedSamples: 0, playedFrames: 0, bufferedMs: 0, playing: false };
    this.lastReport = 0;
    this.port.onmessage = (e) => this.receive(e.data);
  }

  receive(msg) {
    const { samples, sampleRate: rate } = msg;
    if (rate !== this.srcRate) {
      this.srcRate = rate;
      if (this.ring.length < rate * 20) {
        this.ring = new Float32Array(rate * 20);
        this.written = this.read = 0;
      }
    }
    const cap = this.ring.length;
    for (let i = 0; i < samples.length; i++) this.ring[(this.written + i) % cap] = samples[i];
    this.written += samples.length;
    const maxSamples = (this.maxBufferMs / 1000) * this.srcRate;
    if (this.written - this.read > maxSamples) {
      const target = this.written - (this.prebufferMs / 1000) * this.srcRate;
      this.stats.droppedSamples += Math.round(target - this.read);
      this.read = target;
    }
  }

  buffered() {
    return this.written - this.read;
  }

  process(_inputs, outputs) {
    const out = outputs[0];
    const ch0 = out[0];
    const step = this.srcRate / sampleRate;
    const cap = this.ring.length;
    if (!this.playing && this.buffered() >= (this.prebufferMs / 1000) * this.srcRate) this.playing = true;
    for (let i = 0; i < ch0.length; i++) {
      if (!this.playing) { ch0[i] = 0; continue; }
      const k = Math.floor(this.read), f = this.read - k;
      if (k + 1 >= this.written) {
        // Ran dry: silence until the prebuffer is full again (a glitch is counted once).
        this.playing = false;
        this.stats.underruns++;
        ch0[i] = 0;
        continue;
      }
      const a = this.ring[k % cap];
      ch0[i] = a + (this.ring[(k + 1) % cap] - a) * f;
      this.read += step;
      this.stats.playedFrames++;
    }
    for (let c = 1; c < out.length; c++) out[c].set(ch0);
    if (currentTime - this.lastReport > 0.25) {
      this.lastReport = currentTime;
      this.stats.bufferedMs = (1000 * this.buffered()) / this.srcRate;
      this.stats.playing = this.playing;
      this.port.postMessage(this.stats);
    }
    return true;
  }
}

registerProcessor("moshi-capture", CaptureProcessor);
registerProcessor("moshi-playback", PlaybackProcessor);
