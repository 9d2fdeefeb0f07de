// The page: connection, protocol dispatch, transcript, errors, status. Audio lives in mic.js /
// player.js, the TTT panel in ttt-panel.js.
//
// Wire format (GET /api/chat, binary websocket messages, first byte = kind): 0x00 handshake, 0x01 Ogg
// Opus audio (both ways), 0x02 text piece, 0x03 control, 0x04 metadata JSON, 0x05 error, 0x06 ping.
// The server sends 0x04 (model info, TTT telemetry) only when asked with ?telemetry=1, which this page does;
// with "Remember this conversation" it asks ?memory=1 (0x04 {"memory": ...} brings the resume token, kept by
// memory.js), and "Resume" connects with ?resume=TOKEN (the new token it is sent is confirmed with a client
// 0x04 and kept once the server acknowledges it). The whole protocol: docs/protocol.md.

import { Microphone, SAMPLE_RATE } from "./mic.js";
import { Player } from "./player.js";
import { TTTPanel } from "./ttt-panel.js";
import { ConversationMemory } from "./memory.js";

const KIND = { HANDSHAKE: 0, AUDIO: 1, TEXT: 2, CONTROL: 3, METADATA: 4, ERROR: 5, PING: 6 };
const SILENCE_LIMIT_MS = 10000; // like Kyutai's client: no message for this long ⇒ the server is gone
const $ = (id) => document.getElementById(id);

// Counters for people (the status line) and for tests (window.moshiStats).
const stats = {
  state: "idle", handshake: false, sentPackets: 0, sentPages: 0, sentBytes: 0, receivedPages: 0,
  decodedSamples: 0, decodedSeconds: 0, textPieces: 0, metadataUpdates: 0, tttUpdates: 0, underruns: 0,
  bufferedMs: 0, errors: [], info: null, lastTelemetry: null, memory: null, firstTelemetry: null, forgotten: null,
  file: null, // {name, seconds, ended} while an audio file is the microphone
};
window.moshiStats = stats;

const panel = new TTTPanel($("ttt-layers"));
const memory = new ConversationMemory();
let conv = null; // the current conversation: {ws, ctx, mic, player, ...}

// -- environment checks ------------------------------------------------------------------------------

function unsupported() {
  const local = ["localhost", "127.0.0.1", "[::1]"].includes(location.hostname);
  if (!window.isSecureContext || !navigator.mediaDevices?.getUserMedia) {
    return `This page is served over plain http from ${location.host}${local ? "" : ", which is not localhost"}: ` +
      "browsers block the microphone and audio worklets on such pages. Start the server with " +
      "--ssl DIR (https) and open the https:// address, or reach it through a tunnel (for example " +
      "ssh -L 8998:localhost:8998 <server>, then open http://localhost:8998).";
  }
  if (!window.AudioWorkletNode) return "This browser does not support audio worklets; use a recent Chrome, Edge, Firefox or Safari.";
  if (!window.AudioEncoder || !window.AudioDecoder) {
    return "This browser lacks WebCodecs audio (AudioEncoder / AudioDecoder), which this page uses for Opus; " +
      "use a recent Chrome, Edge or Firefox.";
  }
  return null;
}

// -- user-facing messages ----------------------------------------------------------------------------

function explain(reason) {
  const r = reason.toLowerCase();
  if (r.startsWith("server busy")) return "The server is busy: all its conversation slots are in use. Try again in a moment.";
  if (r.includes("api key") || r.startsWith("401")) return "The server needs an API key, and the one given is missing or wrong. Enter it in the API key field.";
  if (r.startsWith("idle timeout")) return "The server ended the conversation because it received no audio for a while. Is the microphone muted?";
  if (r.includes("shutting down")) return "The server is shutting down. Try again once it is back.";
  if (r.startsWith("invalid audio") || r.startsWith("protocol error")) return `The server could not use what this page sent (${reason}).`;
  if (r.startsWith("memory not available")) return "The saved conversation could not be resumed: it expired, was deleted, or belongs to another model. It has been forgotten here.";
  if (r.startsWith("client too slow")) return "This browser fell too far behind the server's audio, so the server ended the conversation.";
  return `The server ended the conversation: ${reason}`;
}

function showError(text, detail) {
  const el = $("error");
  el.hidden = false;
  el.textContent = text;
  if (detail && !text.includes(detail)) {
    const d = document.createElement("div");
    d.className = "detail";
    d.textContent = `Server said: “${detail}”`;
    el.append(d);
  }
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setState(state, label = state) {
  stats.state = state;
  const el = $("state");
  el.textContent = label;
  el.dataset.state = state;
  const busy = state === "connecting" || state === "waiting" || state === "live";
  $("connect").disabled = busy;
  $("disconnect").disabled = !busy;
  $("api-key").disabled = busy;
  $("remember").disabled = busy;
  $("audio-file").disabled = busy;
  renderMemory(busy);
}

/** The "Resume (saved …)" / "Forget" row: shown while this browser holds a remembered conversation. */
function renderMemory(busy = conv && !conv.ended) {
  const m = memory.get();
  $("saved").hidden = !m || Boolean(busy);
  if (m) $("resume").textContent = `Resume (${ConversationMemory.describe(m, stats.info?.frame_rate || 12.5)})`;
}

// -- connection ----------------------------------------------------------------------------------------

function chatUrl(resumeToken = null) {
  const url = new URL("api/chat", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const key = $("api-key").value.trim();
  if (key) url.searchParams.set("api_key", key);
  url.searchParams.set("telemetry", "1"); // the TTT panel's data
  if (resumeToken) url.searchParams.set("resume", resumeToken); // a resumed conversation is remembered again
  else if ($("remember").checked) url.searchParams.set("memory", "1");
  return url;
}

/** An AudioContext at 24 kHz with our worklets and the microphone wired to it, or the audio file `file` (a
 * File), decoded by the browser at the context's rate. Browsers that cannot connect a microphone to a context at
 * another rate than the device's (Firefox) get the device rate: the capture worklet resamples to 24 kHz. */
async function openAudio(c, file = null) {
  for (const rate of [SAMPLE_RATE, undefined]) {
    const ctx = new AudioContext(rate ? { sampleRate: rate, latencyHint: "interactive" } : { latencyHint: "interactive" });
    const mic = new Microphone({
      onPage: (page) => sendAudio(c, page),
      onLevel: (rms) => { $("level").style.width = `${Math.min(100, 400 * rms)}%`; },
      onError: (msg) => fail(c, "Audio encoding failed in this browser.", msg),
    });
    try {
      await ctx.audioWorklet.addModule(new URL("worklets.js", import.meta.url));
      let buffer = null;
      if (file) {
        try {
          buffer = await ctx.decodeAudioData(await file.arrayBuffer());
        } catch (e) {
          throw Object.assign(new Error(`${file.name} is not an audio file this browser can decode`), { name: "FileError" });
        }
        stats.file = { name: file.name, seconds: buffer.duration, ended: false };
      }
      await mic.open(ctx, buffer);
      return { ctx, mic };
    } catch (e) {
      mic.close();
      closeContext(ctx);
      if (e.name === "NotSupportedError" && rate) continue;
      throw e;
    }
  }
}

function closeContext(ctx) {
  if (ctx && ctx.state !== "closed") ctx.close().catch(() => {});
}

function micProblem(e) {
  if (e.name === "FileError") return `Could not play the file: ${e.message}.`;
  if (e.name === "NotAllowedError") return "Microphone access was denied. Allow it for this site in the browser's settings, then connect again.";
  if (e.name === "NotFoundError") return "No microphone was found. Plug one in, then connect again.";
  if (e.name === "NotReadableError") return "The microphone is in use by another application or could not be opened.";
  return `Could not start the audio: ${e.message || e.name}`;
}

async function connect(resumeToken = null, file = null) {
  const problem = unsupported();
  if (problem) return;
  clearError();
  resetConversationView();
  setState("connecting", file ? `reading ${file.name}…` : "starting the microphone…");
  const c = { closedByUser: false, opened: false, serverError: false, ended: false, lastMessage: performance.now(),
    resumeToken, remembered: Boolean(resumeToken) || $("remember").checked };
  conv = c;
  try {
    Object.assign(c, await openAudio(c, file));
    if (c.ended) { // disconnected while the microphone was starting
      c.mic.close();
      closeContext(c.ctx);
      return;
    }
    c.player = new Player(c.ctx, { onError: (msg) => fail(c, "Could not decode the server's audio in this browser.", msg) });
    await c.ctx.resume();
  } catch (e) {
    if (c.closedByUser) return;
    teardown(c);
    setState("idle", "idle");
    showError(micProblem(e));
    return;
  }
  if (c.ended) return;
  setState("waiting", "connecting…");
  const ws = new WebSocket(chatUrl(resumeToken));
  ws.binaryType = "arraybuffer";
  c.ws = ws;
  ws.onopen = () => { c.opened = true; setState("waiting", "waiting for the server…"); };
  ws.onmessage = (e) => onMessage(c, new Uint8Array(e.data));
  ws.onclose = (e) => onClose(c, e);
  c.timer = setInterval(() => refresh(c), 250);
}

function sendAudio(c, page) {
  if (!c.ws || c.ws.readyState !== WebSocket.OPEN) return;
  const msg = new Uint8Array(page.length + 1);
  msg[0] = KIND.AUDIO;
  msg.set(page, 1);
  c.ws.send(msg);
  stats.sentPages++;
  stats.sentBytes += msg.length;
  stats.sentPackets = c.mic.packets;
}

function onMessage(c, bytes) {
  if (c.ended || bytes.length === 0) return;
  c.lastMessage = performance.now();
  const payload = bytes.subarray(1);
  switch (bytes[0]) {
    case KIND.HANDSHAKE:
      stats.handshake = true;
      c.startedAt = performance.now();
      c.mic.start();
      setState("live", stats.file ? `live — playing ${stats.file.name}` : "live — talk!");
      break;
    case KIND.AUDIO:
      c.player.push(payload);
      break;
    case KIND.TEXT:
      addText(new TextDecoder().decode(payload));
      break;
    case KIND.METADATA:
      onMetadata(c, JSON.parse(new TextDecoder().decode(payload)));
      break;
    case KIND.ERROR: {
      const reason = new TextDecoder().decode(payload);
      stats.errors.push(reason);
      c.serverError = true;
      if (c.resumeToken && reason.toLowerCase().startsWith("memory not available")) {
        memory.clear();
        renderMemory(false);
      }
      showError(explain(reason), reason);
      break;
    }
    default: // 0x03 control, 0x06 ping: nothing to do
      break;
  }
}

function sendMetadata(c, obj) {
  if (!c.ws || c.ws.readyState !== WebSocket.OPEN) return;
  const body = new TextEncoder().encode(JSON.stringify(obj));
  const msg = new Uint8Array(body.length + 1);
  msg[0] = KIND.METADATA;
  msg.set(body, 1);
  c.ws.send(msg);
}

/** The server's memory messages. A new memory's token is kept at once. A resumed conversation's new token is
 * confirmed to the server and kept only once the server acknowledges it: until then the old token is the one
 * that opens the memory (a drop before the acknowledgement keeps it). docs/protocol.md. */
function onMemory(c, m) {
  if (m.token && m.resumed) {
    stats.memory = m;
    c.pendingMemory = m;
    sendMetadata(c, { memory: { confirm: m.token } });
  } else if (m.token) {
    stats.memory = m;
    memory.issued(m);
  } else if (m.confirmed && c.pendingMemory && c.pendingMemory.id === m.id) {
    memory.issued({ ...c.pendingMemory, expires: m.expires });
    c.pendingMemory = null;
  } else if (m.error) {
    stats.errors.push(`memory: ${m.error}`);
  }
}

function onMetadata(c, msg) {
  stats.metadataUpdates++;
  if (msg.type === undefined && msg.memory) { // the memory messages (the info message also has a "memory" key)
    onMemory(c, msg.memory);
  } else if (msg.type === "info") {
    stats.info = msg;
    panel.setInfo(msg);
    const ttt = msg.ttt?.layer;
    $("model").textContent = [
      msg.demo ? "demo model: an echo (you hear yourself ≈ 1 s later, whispered) — a test of the pipeline, not a conversation" : msg.model, msg.device && `${msg.device}/${msg.dtype}`,
      msg.ttt_layers && `TTT layers ${msg.ttt_layers.join(", ")}`,
      ttt && `chunk ${ttt.chunk_size} frames (${(ttt.chunk_size / (msg.frame_rate || 12.5)).toFixed(2)} s), η ${ttt.lr}, init ${ttt.init}`,
    ].filter(Boolean).join(" · ");
  } else if (msg.type === "ttt") {
    stats.tttUpdates++;
    stats.lastTelemetry = msg;
    stats.firstTelemetry ??= msg;
    if (conv?.remembered) memory.progressed(msg.frames);
    if (conv) conv.decodedAtTelemetry = conv.player?.decodedSeconds ?? 0;
    panel.update(msg);
  }
}

async function onClose(c, e) {
  if (c.ended) return;
  const wasLive = stats.handshake && c.opened;
  teardown(c);
  if (c.closedByUser) {
    setState("idle", "disconnected");
  } else if (c.serverError) {
    setState("ended", "ended by the server");
  } else if (!c.opened) {
    setState("ended", "could not connect");
    showError(await diagnose());
  } else {
    setState("ended", "connection lost");
    showError(wasLive
      ? "The connection to the server was lost (the server stopped, or the network went down)."
      : `The server closed the connection before the conversation started (code ${e.code}).`);
  }
}

/** Why did the websocket fail before opening? Browsers do not say; a plain GET of the same URL does. */
async function diagnose() {
  const url = chatUrl();
  url.protocol = location.protocol;
  try {
    const r = await fetch(url, { cache: "no-store" });
    if (r.status === 401) return explain("401 api key");
    return `The server refused the conversation (HTTP ${r.status}).`;
  } catch {
    return `Could not reach the server at ${location.host}: is moshi-ttt serve running?`;
  }
}

function fail(c, text, detail) {
  if (c.ended) return;
  if (detail) stats.errors.push(detail);
  showError(text, detail);
  teardown(c);
  setState("ended", "stopped");
}

function disconnect() {
  if (!conv) return;
  conv.closedByUser = true;
  if (conv.ws && conv.ws.readyState <= WebSocket.OPEN) conv.ws.close(1000, "bye");
  else onClose(conv, { code: 1000 });
}

function teardown(c) {
  if (c.ended) return;
  c.ended = true;
  refresh(c);
  clearInterval(c.timer);
  c.mic?.close();
  c.player?.close();
  if (c.ws && c.ws.readyState <= WebSocket.OPEN) c.ws.close(1000);
  closeContext(c.ctx);
  $("level").style.width = "0";
}

// -- view --------------------------------------------------------------------------------------------

function resetConversationView() {
  Object.assign(stats, {
    handshake: false, sentPackets: 0, sentPages: 0, sentBytes: 0, receivedPages: 0, decodedSamples: 0,
    decodedSeconds: 0, textPieces: 0, metadataUpdates: 0, tttUpdates: 0, underruns: 0, bufferedMs: 0,
    errors: [], info: null, lastTelemetry: null, memory: null, firstTelemetry: null, file: null,
  });
  $("transcript").textContent = "";
  $("model").textContent = "";
  panel.reset();
}

function addText(piece) {
  stats.textPieces++;
  const el = $("transcript");
  el.append(piece);
  el.scrollTop = el.scrollHeight;
}

/** Copies live counters into window.moshiStats and the status line; ticks the TTT clocks. */
function refresh(c) {
  if (c.player) {
    stats.receivedPages = c.player.pages;
    stats.decodedSamples = c.player.decodedSamples;
    stats.decodedSeconds = c.player.decodedSeconds;
    stats.underruns = c.player.jitter.underruns;
    stats.bufferedMs = Math.round(c.player.jitter.bufferedMs);
    // The server sends one 80 ms frame per frame it processed: extrapolate its frame count.
    const t = stats.lastTelemetry;
    if (t && !c.ended) {
      const since = Math.floor((stats.decodedSeconds - c.decodedAtTelemetry) * panel.frameRate);
      panel.redraw(t.frames + Math.max(0, since));
    }
  }
  if (c.mic) stats.sentPackets = c.mic.packets;
  if (c.mic && stats.file) stats.file.ended = Boolean(c.mic.fileEnded);
  if (c.ended) return;
  if (stats.state === "live" && performance.now() - c.lastMessage > SILENCE_LIMIT_MS) {
    fail(c, "The server stopped responding (nothing received for 10 s).", null);
    return;
  }
  const secs = c.startedAt ? ((performance.now() - c.startedAt) / 1000).toFixed(0) : 0;
  $("status").textContent = stats.handshake
    ? `${secs} s${stats.file ? ` · ${stats.file.name} (${stats.file.seconds.toFixed(1)} s)${stats.file.ended ? " ended" : ""}` : ""}` +
      ` · sent ${stats.sentPackets} Opus packets · received ${stats.decodedSeconds.toFixed(1)} s of audio ` +
      `· buffer ${stats.bufferedMs} ms · ${stats.underruns} gap${stats.underruns === 1 ? "" : "s"}`
    : "";
}

// -- start-up ------------------------------------------------------------------------------------------

function init() {
  const key = new URLSearchParams(location.search).get("api_key");
  if (key) $("api-key").value = key;
  $("connect").onclick = () => connect();
  $("audio-file").onchange = (e) => { // a recorded conversation as the microphone
    const file = e.target.files[0];
    e.target.value = ""; // the same file again is a new choice
    if (file && !$("connect").disabled) connect(null, file);
  };
  $("apikey-form").onsubmit = (e) => { e.preventDefault(); if (!$("connect").disabled) connect(); };
  $("disconnect").onclick = disconnect;
  $("resume").onclick = () => { const m = memory.get(); if (m) connect(m.token); };
  $("forget").onclick = async () => {
    try {
      stats.forgotten = await memory.forget($("api-key").value.trim());
    } catch (e) {
      stats.forgotten = 0;
      showError("Could not reach the server to delete the saved conversation; it is forgotten in this browser only.", e.message);
    }
    renderMemory();
  };
  setState("idle", "idle");
  const problem = unsupported();
  if (problem) {
    const n = $("notice");
    n.textContent = problem;
    n.hidden = false;
    $("connect").disabled = true;
    $("audio-file").disabled = true;
    stats.state = "unsupported";
  }
}

init();
