// The live TTT panel: per TTT layer, the fast-weight drift ‖W − W⁽⁰⁾‖ over the conversation (a canvas
// line plot with a tick at every chunk update) and the chunk clock (time until the next update).
//
// Fed by the server's 0x04 metadata: {"type": "info", "frame_rate", "ttt": {"layer": {"chunk_size"}}, ...}
// once, then {"type": "ttt", "frames", "seconds", "layers": {"<index>": {updates, clips, skipped, drift,
// last_delta_norm, frames_to_update}}} periodically.

const fmt = (x) => (x == null ? "—" : x === 0 ? "0" : Math.abs(x) >= 0.01 && Math.abs(x) < 1000 ? x.toFixed(3) : x.toExponential(2));

class LayerView {
  constructor(parent, index, chunkSize) {
    this.index = index;
    this.chunkSize = chunkSize;
    this.points = []; // [frame, drift]
    this.ticks = []; // frames at which a chunk update was applied
    this.updates = 0;
    this.clock = null; // {framesToUpdate, frame}: the last telemetry's chunk clock
    this.el = document.createElement("div");
    this.el.className = "layer";
    this.el.dataset.layer = index;
    this.el.innerHTML = `
      <div class="layer-head"><b>layer ${index}</b><span class="drift"></span></div>
      <canvas height="120"></canvas>
      <div class="clock"><div class="clock-bar"><span></span></div><span class="clock-text"></span></div>
      <div class="counts"></div>`;
    parent.append(this.el);
    this.canvas = this.el.querySelector("canvas");
    this.driftEl = this.el.querySelector(".drift");
    this.barEl = this.el.querySelector(".clock-bar span");
    this.clockEl = this.el.querySelector(".clock-text");
    this.countsEl = this.el.querySelector(".counts");
  }

  update(frame, t) {
    this.chunkSize = Math.max(this.chunkSize, t.frames_to_update ?? 0);
    const added = t.updates - this.updates;
    if (added > 0) {
      // The last update happened `chunkSize - frames_to_update` frames ago; earlier ones a chunk apart.
      const last = frame + t.frames_to_update - this.chunkSize;
      for (let k = Math.min(added, 1000) - 1; k >= 0; k--) this.ticks.push(last - k * this.chunkSize);
    }
    this.updates = t.updates;
    if (t.drift != null) this.points.push([frame, t.drift]);
    this.clock = { framesToUpdate: t.frames_to_update, frame };
    this.driftEl.textContent = `‖W − W⁽⁰⁾‖ = ${fmt(t.drift)}`;
    this.countsEl.textContent = `${t.updates} update${t.updates === 1 ? "" : "s"} · ${t.clips} clipped · ` +
      `${t.skipped} skipped · last ‖ΔW‖ ${fmt(t.last_delta_norm)}`;
  }

  /** Chunk clock at `frame` (the server's frame count, extrapolated between telemetry messages). */
  tick(frame, frameRate) {
    if (!this.clock) return;
    let left = this.clock.framesToUpdate - Math.max(0, frame - this.clock.frame);
    while (left <= 0) left += this.chunkSize;
    this.barEl.style.width = `${(100 * (this.chunkSize - left)) / this.chunkSize}%`;
    this.clockEl.textContent = `next update in ${left} frame${left === 1 ? "" : "s"} (${(left / frameRate).toFixed(2)} s)`;
  }

  draw(frameRate, nowFrame) {
    const c = this.canvas, dpr = window.devicePixelRatio || 1;
    const w = Math.max(50, c.clientWidth), h = 120;
    if (c.width !== Math.round(w * dpr)) c.width = Math.round(w * dpr);
    c.height = Math.round(h * dpr);
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const pad = { l: 8, r: 8, t: 16, b: 18 };
    const tMax = Math.max(10, nowFrame / frameRate, ...this.points.map(([f]) => f / frameRate)) * 1.05;
    const yMax = Math.max(1e-12, ...this.points.map(([, d]) => d)) * 1.15;
    const X = (f) => pad.l + ((f / frameRate) / tMax) * (w - pad.l - pad.r);
    const Y = (d) => h - pad.b - (d / yMax) * (h - pad.t - pad.b);
    const css = getComputedStyle(this.el);
    const color = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
    // axes
    g.strokeStyle = color("--grid", "#ccc");
    g.lineWidth = 1;
    g.beginPath();
    g.moveTo(pad.l, Y(0) + 0.5);
    g.lineTo(w - pad.r, Y(0) + 0.5);
    g.stroke();
    // chunk updates: a faint line through the plot and a mark under the axis
    g.strokeStyle = color("--tick", "#e07b00");
    for (const f of this.ticks) {
      const x = Math.round(X(f)) + 0.5;
      g.globalAlpha = 0.25;
      g.beginPath(); g.moveTo(x, pad.t); g.lineTo(x, Y(0)); g.stroke();
      g.globalAlpha = 1;
      g.beginPath(); g.moveTo(x, Y(0) + 2); g.lineTo(x, Y(0) + 7); g.stroke();
    }
    // drift
    if (this.points.length) {
      g.strokeStyle = color("--line", "#1f6feb");
      g.lineWidth = 2;
      g.beginPath();
      this.points.forEach(([f, d], i) => (i ? g.lineTo(X(f), Y(d)) : g.moveTo(X(f), Y(d))));
      g.stroke();
    }
    // labels
    g.fillStyle = color("--muted", "#666");
    g.font = "11px system-ui, sans-serif";
    g.textBaseline = "top";
    g.fillText(`max ${fmt(yMax / 1.15)}`, pad.l, 2);
    g.textBaseline = "bottom";
    g.textAlign = "right";
    g.fillText(`${(tMax / 1.05).toFixed(0)} s`, w - pad.r, h);
    g.textAlign = "left";
    g.fillText("0 s", pad.l, h);
  }
}

export class TTTPanel {
  constructor(container) {
    this.container = container;
    this.reset();
  }

  reset() {
    this.layers = new Map();
    this.frameRate = 12.5;
    this.chunkSize = 0;
    this.frame = 0;
    this.updates = 0;
    this.container.innerHTML = '<p class="empty">Connect to watch the fast weights adapt.</p>';
  }

  setInfo(info) {
    if (info.frame_rate) this.frameRate = info.frame_rate;
    this.chunkSize = info.ttt?.layer?.chunk_size ?? this.chunkSize;
    if (info.ttt_layers && info.ttt_layers.length === 0) {
      this.container.innerHTML = '<p class="empty">This model has no TTT layers.</p>';
    }
  }

  /** One {"type": "ttt"} message. */
  update(msg) {
    if (this.layers.size === 0) this.container.innerHTML = "";
    this.frame = msg.frames;
    this.updates++;
    const order = Object.keys(msg.layers).sort((a, b) => a - b);
    for (const key of order) {
      let view = this.layers.get(key);
      if (!view) {
        view = new LayerView(this.container, key, this.chunkSize);
        this.layers.set(key, view);
      }
      view.update(msg.frames, msg.layers[key]);
    }
    this.redraw(msg.frames);
  }

  /** Redraws plots and clocks; `frame` = the current server frame estimate. */
  redraw(frame = this.frame) {
    for (const view of this.layers.values()) {
      view.tick(frame, this.frameRate);
      view.draw(this.frameRate, frame);
    }
  }
}
