/**
 * @pgpush/client: the browser client for a pgpush event stream (GET /events). One ES module, no
 * dependencies; the demo page of `pgpush serve` uses this very file (served as /static/pgpush-client.js).
 *
 *   import { connect } from "@pgpush/client";
 *   const stream = connect({
 *     getTicket: async () => (await (await fetch("/my-app/pgpush-ticket")).json()).ticket,
 *     onMessage: (m) => console.log(m.type, m.id, m.data),  // every row, whatever its type; data is parsed
 *     onStatus: (s) => console.log(s.state, s),
 *     onReset: ({ reason }) => reloadInboxOverRest(reason),
 *   });
 *   stream.reconnect();                       // e.g. after the user signed in again
 *   stream.close();
 *
 * Transport. The stream is read with fetch() and parsed here (WHATWG server-sent events format) rather
 * than with EventSource, which drops every named event nobody registered a listener for, hides the HTTP
 * status and cannot send a header. So every row arrives, of any type, and a refused token is told from an
 * outage at once. It also runs in Node 18+ (fetch and web streams built in) with an absolute `url`.
 *
 * Credentials, one of three. `getTicket: async () => "<ticket>"`: a short-lived ticket from
 * POST /events/ticket (your backend or the page fetches it), called for every new connection and sent as
 * `?ticket=`. `token: "<JWT>"` or `token: () => "<JWT>"` (sync or async, called for every new connection):
 * sent as `Authorization: Bearer`, never in the URL. Neither: the `pgpush_token` cookie (same origin; set
 * `withCredentials: true` for a stream on another origin, CORS). A long-lived token never goes in a URL.
 *
 * One stream per browser. Browsers allow six HTTP/1.1 connections per host, so every tab of an origin
 * shares ONE stream: the tabs queue on a Web Lock (`navigator.locks`, name `lockName`); the tab holding
 * it opens the stream and relays every row and status change to the others over a BroadcastChannel
 * (`channelName`). When that tab closes, the browser releases its lock (a moment after the tab is gone),
 * the next tab gets it and reopens the stream from the last event id it saw in the relayed messages, so
 * nothing is lost (a row relayed twice is dropped by its id). Without Web Locks or BroadcastChannel
 * (e.g. plain http from a host other than localhost: Web Locks needs a secure context), or with
 * `shared: false`, each tab opens its own stream.
 * The tab holding the stream connects with ITS credentials and every tab sharing the names gets its rows:
 * an app that can sign different users in in different tabs of one origin (per-tab tokens) must give
 * each user its own names, e.g. `lockName: "pgpush-" + userId, channelName: "pgpush-" + userId`.
 *
 * Pauses and restarts. pgpush closes an idle stream with `event: pause` and
 * `data: {"reconnect_at": <epoch ms>}`; the client reconnects at that time with `?lastEventId=<id>`. When
 * the stream ends otherwise (server restart, drain, lifetime) it comes back after the stream's last
 * `retry:`; an unreachable server or an error status is retried with a backoff (honouring Retry-After),
 * 401/403 stops with status "unauthorized". `event: token_expired` stops with status "expired"; call
 * `reconnect()` once the user has a new token. `event: reset` (the client's cursor is unknown, or there
 * are more unread rows than the server replays) calls `onReset`: reload the inbox over REST
 * (GET /me/messages?unread=true). Every wait is capped at 15 minutes.
 *
 * Control events. `pause`, `reset`, `token_expired` and names starting with `pgpush` are pgpush's own;
 * they are never delivered as rows, and obeyed only without an `id:` of their own (as pgpush sends them).
 *
 * Marking read. Mark `through` the highest `id` your user has been shown (ids are integers that may exceed
 * 2^53: keep them as the strings given here), never through one they have not seen.
 *
 * Statuses passed to onStatus: {state: "connecting" | "live" | "reconnecting" | "paused" | "down" |
 * "expired" | "unauthorized" | "closed", leader: whether this tab holds the stream, reconnectAt: epoch ms
 * (paused, down), lastEventId}.
 */

const CONTROL_EVENTS = ["pause", "reset", "token_expired"];
const BACKOFF_MS = [1000, 2000, 5000, 10000, 30000];
// The longest the client waits before reconnecting, whatever a pause or Retry-After says: setTimeout fires
// at once for delays past 2^31 - 1 ms, and a user should never be left days without a stream.
const MAX_DELAY_MS = 15 * 60 * 1000;

/** pgpush's own event names: the three above and any future one starting with `pgpush`. */
export function isControl(type) {
  return CONTROL_EVENTS.includes(type) || type.startsWith("pgpush");
}

function clampDelay(ms) {
  return Number.isFinite(ms) ? Math.min(Math.max(ms, 0), MAX_DELAY_MS) : MAX_DELAY_MS;
}

const DEFAULTS = {
  url: "/events",
  getTicket: null,
  token: null,
  withCredentials: false,
  onMessage: () => {},
  onStatus: () => {},
  onReset: () => {},
  shared: true,
  lockName: "pgpush-stream",
  channelName: "pgpush-stream",
};

/**
 * Open (or join) the browser's shared pgpush stream. Types: index.d.ts.
 * @param {object} options
 * @param {string} [options.url="/events"] the stream's URL (relative to the page; absolute outside one)
 * @param {() => string | Promise<string>} [options.getTicket] a fresh ticket per connection (`?ticket=`)
 * @param {string | (() => string | Promise<string>)} [options.token] a JWT sent as `Authorization: Bearer`
 * @param {boolean} [options.withCredentials=false] send cookies to a stream on another origin (CORS)
 * @param {(message: {type: string, id: string, data: unknown}) => void} [options.onMessage] every row
 * @param {(status: object) => void} [options.onStatus]
 * @param {(info: {reason: string}) => void} [options.onReset] reload the inbox over REST
 * @param {boolean} [options.shared=true] share one stream between the tabs of this origin
 * @param {string} [options.lockName="pgpush-stream"] Web Lock name; tabs with the same name share a stream
 * @param {string} [options.channelName="pgpush-stream"] BroadcastChannel name
 */
export function connect(options = {}) {
  for (const name of Object.keys(options)) {
    // A misspelt or 0.3 option (onEvent, ticket) would otherwise be ignored without a word.
    if (!Object.hasOwn(DEFAULTS, name)) throw new TypeError(`pgpush connect(): unknown option "${name}"`);
  }
  const opts = { ...DEFAULTS };
  for (const [name, value] of Object.entries(options)) if (value !== undefined) opts[name] = value;
  if (opts.getTicket && opts.token) {
    throw new TypeError("pgpush connect(): pass getTicket or token, not both");
  }
  // Fails at once on a URL that cannot be resolved (a relative one outside a page, e.g. in Node).
  const streamBase = new URL(opts.url, globalThis.location?.href).href;
  const canShare = opts.shared && typeof BroadcastChannel === "function" && globalThis.navigator?.locks;
  const channel = canShare ? new BroadcastChannel(opts.channelName) : null;

  let leader = false;
  let closed = false;
  let lastEventId = null; // the newest row id seen (string), kept across pauses, reconnects, hand-overs
  let status = { state: "connecting" };
  let source = null;
  let timer = null;
  let failures = 0;
  let releaseLock = null;
  let generation = 0; // bumped by every (re)connect and stop: a slower, older attempt then gives up
  let retryMs = 3000; // the stream's latest `retry:`, the wait before coming back after it ends
  const lockRequest = new AbortController();

  function setStatus(next) {
    status = next;
    const full = { ...next, leader, lastEventId };
    opts.onStatus(full);
    if (leader && channel) channel.postMessage({ kind: "status", status: next, lastEventId });
  }

  /** Deliver a row event once: the stream and the relay may both carry one across a hand-over. */
  function deliver(type, id, rawData) {
    if (id !== "" && lastEventId !== null && notBefore(lastEventId, id)) return false;
    if (id !== "") lastEventId = id;
    let data;
    try {
      data = JSON.parse(rawData);
    } catch {
      data = rawData; // pgpush always sends JSON; keep anything else readable rather than throw
    }
    opts.onMessage({ type, id, data });
    return true;
  }

  /** The payload of a control event (pause, reset) as an object; a reset also forgets the cursor. */
  function controlData(type, rawData) {
    let data = null;
    try {
      data = JSON.parse(rawData);
    } catch {
      // an empty or foreign payload: act on the event alone
    }
    if (data === null || typeof data !== "object") data = {};
    if (type === "reset") {
      lastEventId = null; // the client's cursor means nothing to the server any more: start over
      opts.onReset({ reason: String(data.reason ?? "reset") });
    }
    return data;
  }

  // ---- the tab that holds the stream -------------------------------------------------------------

  /** The URL and headers of a new connection: the cursor, and a fresh ticket or token. */
  async function streamRequest() {
    const url = new URL(streamBase);
    const headers = { Accept: "text/event-stream" };
    if (lastEventId !== null) url.searchParams.set("lastEventId", lastEventId);
    if (opts.getTicket) url.searchParams.set("ticket", await opts.getTicket());
    if (opts.token) {
      const token = typeof opts.token === "function" ? await opts.token() : opts.token;
      headers.Authorization = `Bearer ${token}`;
    }
    return { url: url.href, headers };
  }

  function stopSource() {
    generation += 1;
    clearTimeout(timer);
    timer = null;
    source?.abort();
    source = null;
  }

  /** One event as pgpush sends it: a row (with its `id:`) or a control event (without one). */
  function onFrame(frame) {
    if (!isControl(frame.event)) {
      failures = 0;
      if (deliver(frame.event, frame.id ?? "", frame.data) && channel) {
        channel.postMessage({ kind: "event", type: frame.event, id: frame.id ?? "", data: frame.data });
      }
      return;
    }
    // pgpush sends its control events without an `id:`. A control name with an id is a row that should
    // never have been written (or a forged one): ignored, never obeyed. Unknown pgpush* names too.
    if (frame.id !== null) return;
    if (frame.event === "pause") {
      const { reconnect_at: at } = controlData("pause", frame.data);
      stopSource();
      const delay = clampDelay(Number.isFinite(at) ? at - Date.now() : 60000);
      setStatus({ state: "paused", reconnectAt: Date.now() + delay });
      timer = setTimeout(open, delay);
    } else if (frame.event === "token_expired") {
      stopSource();
      setStatus({ state: "expired" });
    } else if (frame.event === "reset") {
      controlData("reset", frame.data);
      if (channel) channel.postMessage({ kind: "reset", data: frame.data });
    }
  }

  async function open() {
    stopSource();
    const attempt = generation;
    if (closed || !leader) return;
    const abort = new AbortController();
    source = abort;
    setStatus({ state: status.state === "live" ? "reconnecting" : "connecting" });
    let response;
    try {
      const { url, headers } = await streamRequest();
      if (attempt !== generation) return;
      response = await fetch(url, {
        signal: abort.signal,
        credentials: opts.withCredentials ? "include" : "same-origin",
        headers,
        cache: "no-store",
      });
    } catch (error) {
      if (attempt === generation) retryLater(null, `unreachable: ${error?.message ?? error}`);
      return;
    }
    if (attempt !== generation) return;
    if (response.status === 401 || response.status === 403) {
      source = null;
      setStatus({ state: "unauthorized", httpStatus: response.status });
      return;
    }
    if (!response.ok || !response.body) {
      retryLater(response, `HTTP ${response.status}`);
      return;
    }
    setStatus({ state: "live" });
    try {
      await readEvents(
        response.body,
        (frame) => attempt === generation && onFrame(frame),
        (ms) => {
          retryMs = ms;
        },
      );
    } catch {
      // the connection dropped
    }
    if (attempt !== generation) return; // stopped on purpose: pause, token_expired, close, a newer connect
    // The server ended the stream (restart, drain, lifetime) or the network dropped: back after `retry:`.
    setStatus({ state: "reconnecting" });
    timer = setTimeout(open, clampDelay(retryMs));
  }

  function retryLater(response, reason) {
    const retryAfter = Number(response?.headers.get("retry-after"));
    const backoff = BACKOFF_MS[Math.min(failures, BACKOFF_MS.length - 1)];
    failures += 1;
    const delay = clampDelay(Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter * 1000 : backoff);
    const reconnectAt = Date.now() + delay;
    setStatus({ state: "down", reconnectAt, reason });
    timer = setTimeout(open, delay);
  }

  /** Runs while this tab holds the lock; the returned promise keeps it until close() or the tab goes. */
  function lead() {
    if (closed) return undefined;
    leader = true;
    open();
    return new Promise((resolve) => {
      releaseLock = resolve;
    });
  }

  // ---- every tab ---------------------------------------------------------------------------------

  if (channel) {
    channel.onmessage = ({ data: msg }) => {
      if (closed || !msg || typeof msg !== "object") return;
      if (msg.kind === "event" && !leader) {
        deliver(msg.type, msg.id, msg.data);
      } else if (msg.kind === "status" && !leader) {
        if (msg.lastEventId !== null && (lastEventId === null || notBefore(msg.lastEventId, lastEventId))) {
          lastEventId = msg.lastEventId;
        }
        status = msg.status;
        opts.onStatus({ ...msg.status, leader: false, lastEventId });
      } else if (msg.kind === "reset" && !leader) {
        controlData("reset", msg.data);
      } else if (msg.kind === "hello") {
        if (leader) setStatus(status); // tell the newcomer where the stream stands
      } else if (msg.kind === "reconnect" && leader) {
        failures = 0;
        open();
      }
    };
    channel.postMessage({ kind: "hello" });
    opts.onStatus({ state: "connecting", leader: false, lastEventId });
    // Aborted by close() while still queued, so a closed client never takes the lock from the others.
    navigator.locks.request(opts.lockName, { signal: lockRequest.signal }, lead).catch(() => {});
  } else {
    lead();
  }

  return {
    /** Reopen the stream now, e.g. after a pause, an expired token or a new sign-in. */
    reconnect() {
      failures = 0;
      if (leader) open();
      else if (channel) channel.postMessage({ kind: "reconnect" });
    },
    /** Stop: this tab's stream (if it holds it) passes to another tab. */
    close() {
      if (closed) return;
      closed = true;
      stopSource();
      status = { state: "closed" };
      if (leader) opts.onStatus({ state: "closed", leader, lastEventId });
      leader = false;
      lockRequest.abort();
      releaseLock?.();
      channel?.close();
    },
    get lastEventId() {
      return lastEventId;
    },
    get leader() {
      return leader;
    },
    get status() {
      return { ...status, leader, lastEventId };
    },
  };
}

/** True when event id `a` is at or after `b` (ids are integers that may exceed 2^53: compare as text). */
function notBefore(a, b) {
  return a.length !== b.length ? a.length > b.length : a >= b;
}

/**
 * Read a text/event-stream body and call `onFrame({event, data, id})` per event (WHATWG HTML, "Server-sent
 * events": lines end in CRLF, LF or CR; `id` is null when the event had no `id:` field of its own).
 * `retry:` values go to `onRetry`.
 */
export async function readEvents(body, onFrame, onRetry = () => {}) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let skipLF = false; // the last chunk ended in CR: an LF starting the next one belongs to it
  let frame = { event: "", data: [], id: null };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      let text = value;
      if (skipLF && text.startsWith("\n")) text = text.slice(1);
      skipLF = text.endsWith("\r");
      buffer += text;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === "") {
          if (frame.data.length > 0) {
            onFrame({ event: frame.event || "message", data: frame.data.join("\n"), id: frame.id });
          }
          frame = { event: "", data: [], id: null };
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon === -1 ? line : line.slice(0, colon);
        let value = colon === -1 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") frame.event = value;
        else if (field === "data") frame.data.push(value);
        else if (field === "id" && !value.includes("\0")) frame.id = value;
        else if (field === "retry" && /^\d+$/.test(value)) onRetry(Number(value));
      }
    }
  } finally {
    reader.releaseLock();
  }
}
