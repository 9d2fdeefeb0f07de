// Conversation memory on the client: the resume token the server issues (0x04 {"memory": {...}}) is kept in
// this browser's localStorage and nowhere else; the server stores only ciphertext it cannot read without it.
// One remembered conversation per page origin: {id, token, expires (unix s), savedAt (ms), frames}.

const KEY = "moshi-ttt.memory";

export class ConversationMemory {
  constructor(storage = window.localStorage) {
    this.storage = storage;
  }

  /** The remembered conversation, or null (none, unreadable, or expired: then it is dropped). */
  get() {
    let m = null;
    try {
      m = JSON.parse(this.storage.getItem(KEY) || "null");
    } catch {
      m = null;
    }
    if (!m || typeof m.token !== "string" || typeof m.id !== "string") return null;
    if (typeof m.expires === "number" && m.expires * 1000 <= Date.now()) {
      this.clear();
      return null;
    }
    return m;
  }

  /** Keeps what a 0x04 memory message says (a resumed conversation brings a new token: the old one is dead). */
  issued(info) {
    if (!info || typeof info.token !== "string" || typeof info.id !== "string") return;
    const prev = this.get();
    const frames = Number.isFinite(info.frames) ? info.frames : (prev && prev.id === info.id ? prev.frames : 0);
    this.storage.setItem(KEY, JSON.stringify({
      id: info.id, token: info.token, expires: info.expires, savedAt: Date.now(), frames,
    }));
  }

  /** The conversation went on to `frames` frames (the server saves it when it ends). */
  progressed(frames) {
    const m = this.get();
    if (!m || !Number.isFinite(frames)) return;
    m.frames = Math.max(m.frames || 0, frames);
    m.savedAt = Date.now();
    this.storage.setItem(KEY, JSON.stringify(m));
  }

  clear() {
    this.storage.removeItem(KEY);
  }

  /** "saved 3 min ago, 2 min long" for the Resume button. */
  static describe(m, frameRate = 12.5) {
    const ago = Math.max(0, (Date.now() - (m.savedAt || Date.now())) / 60000);
    const when = ago < 1 ? "saved just now" : ago < 90 ? `saved ${Math.round(ago)} min ago`
      : ago < 48 * 60 ? `saved ${Math.round(ago / 60)} h ago` : `saved ${Math.round(ago / 1440)} days ago`;
    const mins = (m.frames || 0) / frameRate / 60;
    return `${when}, ${mins < 1 ? mins.toFixed(1) : Math.round(mins)} min`;
  }

  /** Deletes the memory on the server (DELETE /api/memory/{id}, the token as bearer) and here. Resolves to
   * the HTTP status (204 deleted; 404 already gone or refused); the local copy is dropped in both cases. */
  async forget(apiKey = "") {
    const m = this.get();
    this.clear();
    if (!m) return 404;
    const url = new URL(`api/memory/${encodeURIComponent(m.id)}`, location.href);
    if (apiKey) url.searchParams.set("api_key", apiKey);
    const r = await fetch(url, { method: "DELETE", headers: { Authorization: `Bearer ${m.token}` }, cache: "no-store" });
    return r.status;
  }
}
