/**
 * pgpush-client.js: a browser client for a pgpush event stream (GET /events). One ES module, no
 * dependencies; copy it into your frontend as it is.
 *
 *   import { openStream } from "./pgpush-client.js";
 *   const stream = openStream({
 *     types: ["lead", "notice"],             // named events your app expects (see "Event types" below)
 *     onEvent: (e) => console.log(e.type, e.id, e.data),   // e.data is the parsed JSON payload
 *     onStatus: (s) => console.log(s.state, s),
 *     onReset: (info) => reloadInboxOverRest(info.reason),
 *   });
 *   stream.listen("invoice");                 // one more event type, at any time
 *   stream.reconnect();                       // e.g. after the user signed in again
 *   stream.close();
 *
 * Credentials. By default the stream sends the `pgpush_token` cookie (same origin). Pass
 * `ticket: async () => "<ticket>"` to authenticate with a short-lived ticket from POST /events/ticket
 * instead (the function is called for every new connection; EventSource's own quick reconnects reuse the
 * URL, and a ticket expired by then is replaced by the fallback below). A long-lived token never goes in
 * the URL.
 *
 * One stream per browser. Browsers allow six HTTP/1.1 connections per host, so every tab of an origin
 * shares ONE stream: the tabs queue on a Web Lock (`navigator.locks`, name `lockName`); the tab holding
 * it opens the EventSource and relays every event and status change to the others over a
 * BroadcastChannel (`channelName`). When that tab closes, the browser releases its lock, the next tab gets
 * it and reopens the stream from the last event id it saw in the relayed messages, so nothing is lost
 * (an event relayed twice is dropped by its id). Without Web Locks or BroadcastChannel (e.g. a page
 * served over plain http from a host other than localhost: Web Locks needs a secure context), or with
 * `shared: false`, each tab opens its own stream.
 *
 * Pauses and restarts. pgpush closes an idle stream with `event: pause` and
 * `data: {"reconnect_at": <epoch ms>}`; this client closes the EventSource and opens a new one at that
 * time with `?lastEventId=<id>` (a new EventSource does not inherit the old one's Last-Event-ID). When the
 * server restarts, EventSource reconnects by itself with its Last-Event-ID header; status "reconnecting"
 * is reported meanwhile. If the browser gives up (the server answered with an error status), the client
 * asks the server why: 401/403 stops with status "unauthorized", anything else retries with a backoff
 * (honouring Retry-After). `event: token_expired` stops the stream with status "expired"; call
 * `reconnect()` once the user has a new token. `event: reset` (the client's cursor is unknown, or there
 * are more unread rows than the server replays) calls `onReset`: reload the inbox over REST.
 *
 * Event types. EventSource dispatches a named event (`event: lead`) only to listeners registered for
 * that exact name, and there is no wildcard; events named `message` (the table's default) arrive always.
 * So an event of a type nobody listens for is silently skipped by the browser. List the types your app
 * uses in `types`, and call `listen(type)` for types learned later (e.g. from the REST inbox); the types
 * any tab listens for are shared with the tab that holds the stream. `pause`, `reset`, `token_expired`
 * and names starting with `pgpush` are pgpush's own control events: never delivered as rows, and obeyed
 * only without an `id:` of their own (as pgpush sends them). Waits are capped at 15 minutes.
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
function isControl(type) {
  return CONTROL_EVENTS.includes(type) || type.startsWith("pgpush");
}

function clampDelay(ms) {
  return Number.isFinite(ms) ? Math.min(Math.max(ms, 0), MAX_DELAY_MS) : MAX_DELAY_MS;
}

/**
 * Open (or join) the browser's shared pgpush stream.
 * @param {object} options
 * @param {string} [options.url="/events"] the stream's URL
 * @param {() => Promise<string>} [options.ticket] returns a fresh ticket; omitted: cookie authentication
 * @param {boolean} [options.withCredentials=false] send cookies to a stream on another origin (CORS)
 * @param {string[]} [options.types=[]] named event types to receive (besides `message`)
 * @param {(event: {type: string, id: string, data: unknown}) => void} [options.onEvent]
 * @param {(status: object) => void} [options.onStatus]
 * @param {(info: {reason: string}) => void} [options.onReset]
 * @param {boolean} [options.shared=true] share one stream between the tabs of this origin
 * @param {string} [options.lockName="pgpush-stream"] Web Lock name; tabs with the same name share a stream
 * @param {string} [options.channelName="pgpush-stream"] BroadcastChannel name
 */
export function openStream(options = {}) {
  const opts = {
    url: "/events",
    withCredentials: false,
    types: [],
    onEvent: () => {},
    onStatus: () => {},
    onReset: () => {},
    shared: true,
    lockName: "pgpush-stream",
    channelName: "pgpush-stream",
    ...options,
  };
  const types = new Set(["message", ...opts.types.map(String).filter((type) => !isControl(type))]);
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
  let sourceLastId = ""; // the id of the last row the current EventSource dispatched to this client
  const lockRequest = new AbortController();
  const listeners = new Map(); // type -> listener registered on the current EventSource

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
    opts.onEvent({ type, id, data });
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

  async function streamUrl() {
    const url = new URL(opts.url, location.href);
    if (lastEventId !== null) url.searchParams.set("lastEventId", lastEventId);
    if (opts.ticket) url.searchParams.set("ticket", await opts.ticket());
    return url.href;
  }

  function stopSource() {
    generation += 1;
    clearTimeout(timer);
    timer = null;
    if (source) {
      source.close();
      source = null;
      listeners.clear();
    }
  }

  function addListener(type) {
    if (!source || listeners.has(type)) return;
    const onRow = (event) => {
      failures = 0;
      sourceLastId = event.lastEventId;
      if (deliver(event.type, event.lastEventId, event.data) && channel) {
        channel.postMessage({ kind: "event", type: event.type, id: event.lastEventId, data: event.data });
      }
    };
    listeners.set(type, onRow);
    source.addEventListener(type, onRow);
  }

  async function connect() {
    stopSource();
    const attempt = generation;
    if (closed || !leader) return;
    setStatus({ state: status.state === "live" ? "reconnecting" : "connecting" });
    let url;
    try {
      url = await streamUrl();
    } catch (error) {
      if (attempt === generation) retryLater(null, `ticket: ${error?.message ?? error}`);
      return;
    }
    if (closed || !leader || attempt !== generation) return;
    const es = new EventSource(url, { withCredentials: opts.withCredentials });
    source = es;
    sourceLastId = "";
    /**
     * pgpush sends its control events without an `id:`, so one carries the id of the row before it. A
     * control name with an id of its own is a row that should never have been written (or a forged one):
     * it is ignored, never obeyed. (A row of a type nobody listens for also moves the id, so a real pause
     * right after one is ignored too; the server then closes the stream and EventSource comes back by
     * itself after the pause's `retry:`.)
     */
    const control = (handler) => (event) => {
      if (source === es && event.lastEventId === sourceLastId) handler(event);
    };
    es.onopen = () => setStatus({ state: "live" });
    es.onerror = () => {
      if (source !== es) return;
      // CONNECTING: the connection dropped and EventSource retries by itself (server restart, network).
      if (es.readyState === EventSource.CONNECTING) setStatus({ state: "reconnecting" });
      else diagnose(); // CLOSED: the server answered with an error status; EventSource gave up.
    };
    for (const type of types) addListener(type);
    es.addEventListener(
      "pause",
      control((event) => {
        const { reconnect_at: at } = controlData("pause", event.data);
        stopSource();
        const delay = clampDelay(Number.isFinite(at) ? at - Date.now() : 60000);
        setStatus({ state: "paused", reconnectAt: Date.now() + delay });
        timer = setTimeout(connect, delay);
      }),
    );
    es.addEventListener(
      "token_expired",
      control(() => {
        stopSource();
        setStatus({ state: "expired" });
      }),
    );
    es.addEventListener(
      "reset",
      control((event) => {
        controlData("reset", event.data);
        if (channel) channel.postMessage({ kind: "reset", data: event.data });
      }),
    );
  }

  /** EventSource hides the status code; one plain request tells a rejected token from a passing outage. */
  async function diagnose() {
    stopSource();
    const attempt = generation;
    let response = null;
    const abort = new AbortController();
    try {
      const url = await streamUrl(); // with a fresh ticket: the old one may have expired meanwhile
      if (closed || !leader || attempt !== generation) return;
      response = await fetch(url, {
        signal: abort.signal,
        credentials: opts.withCredentials ? "include" : "same-origin",
        headers: { Accept: "text/event-stream" },
      });
    } catch {
      // the server (or the ticket endpoint) is unreachable: retry below
    } finally {
      abort.abort(); // a 200 here is a stream we do not want: the EventSource reopens it
    }
    if (closed || !leader || attempt !== generation) return;
    if (response && (response.status === 401 || response.status === 403)) {
      setStatus({ state: "unauthorized", httpStatus: response.status });
      return;
    }
    if (response && response.ok) {
      failures = 0;
      connect();
      return;
    }
    retryLater(response, response ? `HTTP ${response.status}` : "unreachable");
  }

  function retryLater(response, reason) {
    const retryAfter = Number(response?.headers.get("retry-after"));
    const backoff = BACKOFF_MS[Math.min(failures, BACKOFF_MS.length - 1)];
    failures += 1;
    const delay = clampDelay(Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter * 1000 : backoff);
    const reconnectAt = Date.now() + delay;
    setStatus({ state: "down", reconnectAt, reason });
    timer = setTimeout(connect, delay);
  }

  /** Runs while this tab holds the lock; the returned promise keeps it until close() or the tab goes. */
  function lead() {
    if (closed) return undefined;
    leader = true;
    connect();
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
        for (const type of msg.types ?? []) listen(type, false);
        if (leader) setStatus(status); // tell the newcomer where the stream stands
      } else if (msg.kind === "listen") {
        for (const type of msg.types ?? []) listen(type, false);
      } else if (msg.kind === "reconnect" && leader) {
        failures = 0;
        connect();
      }
    };
    channel.postMessage({ kind: "hello", types: [...types] });
    opts.onStatus({ state: "connecting", leader: false, lastEventId });
    // Aborted by close() while still queued, so a closed client never takes the lock from the others.
    navigator.locks.request(opts.lockName, { signal: lockRequest.signal }, lead).catch(() => {});
  } else {
    lead();
  }

  function listen(type, announce = true) {
    if (isControl(type) || types.has(type)) return;
    types.add(type);
    addListener(type);
    if (announce && channel) channel.postMessage({ kind: "listen", types: [type] });
  }

  return {
    /** Receive events of one more type (EventSource has no wildcard; see the header comment). */
    listen: (type) => listen(String(type)),
    /** Reopen the stream now, e.g. after a pause, an expired token or a new sign-in. */
    reconnect() {
      failures = 0;
      if (leader) connect();
      else if (channel) channel.postMessage({ kind: "reconnect" });
    },
    /** Stop: this tab's stream (if it holds it) passes to another tab. */
    close() {
      closed = true;
      stopSource();
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
