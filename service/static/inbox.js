/**
 * The pgpush demo inbox (GET /): unread messages from the REST inbox (GET /me/messages?unread=true),
 * live ones from the browser's shared event stream (pgpush-client.js: the package @pgpush/client of
 * clients/js), mark one or all read (POST /me/messages/read). The token comes once in `/#token=…` (a URL
 * fragment never reaches a server or its logs) and is exchanged at POST /session for an HttpOnly
 * `pgpush_token` cookie that no script reads.
 *
 * Every row is shown, whatever its event type (the client delivers all of them; the page renders each the
 * same way: its type, seq, time and JSON). "Mark all read" marks only what is on screen: `through` the
 * highest seq shown when every unread row is loaded, else the shown rows by seq.
 */

import { connect, isControl } from "./pgpush-client.js";

const PAGE_SIZE = 100;

const $ = (id) => document.getElementById(id);
const rows = new Map(); // seq (string) -> {seq, event, data, createdAt, readAt, element}
const inboxChannel = typeof BroadcastChannel === "function" ? new BroadcastChannel("pgpush-inbox") : null;
let nextCursor = null;
let stream = null;
let everLive = false;

// ---- the session ---------------------------------------------------------------------------------------

/** `#token=…` from the address bar, removed from it (and the history) at once. */
function takeTokenFromFragment() {
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (token) history.replaceState(null, "", location.pathname + location.search);
  return token;
}

/** The token's claims, for the switch-user question only: the server verifies the signature. */
function claims(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const bytes = Uint8Array.from(atob(payload), (c) => c.charCodeAt(0));
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    return {};
  }
}

/**
 * Sign in: hand a fragment token to POST /session, which sets an HttpOnly cookie (no script here can read
 * the token afterwards), or keep the session the cookie already holds. A link carrying someone else's token
 * (e.g. one an attacker sent, to have this browser show and mark the attacker's inbox) asks first.
 * Returns the session ({sub, expires_at}), or null with the reason shown.
 */
async function signIn(token) {
  const current = await api("/session").catch(() => null);
  if (!token) return current;
  const next = String(claims(token).sub ?? "an unknown user");
  if (current && current.sub !== next) {
    const question = `This browser is signed in as "${current.sub}". Switch to "${next}"?`;
    if (!window.confirm(question)) return current;
  }
  try {
    const session = await api("/session", undefined, { Authorization: `Bearer ${token}` });
    if (current && current.sub !== session.sub) inboxChannel?.postMessage({ signedIn: session.sub });
    return session;
  } catch (error) {
    showNotice(`The token was rejected (${error.message}): open this page with a new /#token=…`, "error", {
      sticky: true,
    });
    return null;
  }
}

// ---- REST ---------------------------------------------------------------------------------------------

class ApiFailure extends Error {
  constructor(status, body) {
    super(body?.detail ?? `HTTP ${status}`);
    this.status = status;
  }
}

async function api(path, body, headers = {}) {
  const init = { credentials: "same-origin", headers: { Accept: "application/json", ...headers } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = body;
  }
  if (body !== undefined || headers.Authorization) init.method = "POST";
  const response = await fetch(path, init);
  const payload = await response.json().catch(() => null);
  if (!response.ok) throw new ApiFailure(response.status, payload);
  return payload;
}

/** Fill the list from the REST inbox: `replace` starts over (after a reset), otherwise rows are merged. */
async function loadInbox({ replace = false, cursor = null } = {}) {
  const query = new URLSearchParams({ unread: "true", limit: String(PAGE_SIZE) });
  if (cursor) query.set("cursor", cursor);
  const asked = performance.now();
  try {
    const page = await api(`/me/messages?${query}`);
    if (replace) {
      // Start over, but keep what the stream brought while the request was under way: it is newer.
      for (const [seq, row] of rows) {
        if (!(row.arrivedAt >= asked)) {
          row.element.remove();
          rows.delete(seq);
        }
      }
    }
    for (const m of page.messages) {
      // A row named like a control event (written before the table refused such names) is shown by
      // neither path: the stream never delivers it as a row either.
      if (isControl(m.event)) continue;
      const row = { seq: String(m.seq), event: m.event, data: m.data, createdAt: m.created_at, readAt: m.read_at };
      addRow(row, { fromRest: true });
    }
    if (replace || cursor || nextCursor === null) nextCursor = page.next ?? null;
    $("more").hidden = nextCursor === null;
    if (!$("notice").dataset.sticky) showNotice(null);
  } catch (error) {
    showNotice(
      error.status === 401
        ? "The token was rejected: open this page with a new /#token=…"
        : `Could not load the inbox: ${error.message}`,
      "error",
    );
  }
  render();
}

async function markRead(seqs) {
  try {
    await api("/me/messages/read", `{"seqs":[${seqs.join(",")}]}`); // seqs are digit strings: no rounding
    setRead(seqs);
    inboxChannel?.postMessage({ read: seqs });
  } catch (error) {
    showNotice(`Could not mark as read: ${error.message}`, "error");
  }
}

async function markAllRead() {
  const through = newestSeq();
  if (through === null) return;
  $("mark-all").disabled = true;
  try {
    if (nextCursor === null) {
      // Every unread row up to `through` is on screen: one statement marks them all.
      await api("/me/messages/read", `{"through":${through}}`);
      setReadThrough(through);
      inboxChannel?.postMessage({ through });
    } else {
      // Older unread rows were never loaded: marking `through` would mark them unseen. Only what is shown.
      const seqs = [...rows.values()].filter((row) => !row.readAt).map((row) => row.seq);
      if (seqs.length > 0) {
        await api("/me/messages/read", `{"seqs":[${seqs.join(",")}]}`);
        setRead(seqs);
        inboxChannel?.postMessage({ read: seqs });
      }
    }
  } catch (error) {
    showNotice(`Could not mark all as read: ${error.message}`, "error");
  }
  render();
}

// ---- the list -----------------------------------------------------------------------------------------

const bySeq = (a, b) => (a.length !== b.length ? a.length - b.length : a < b ? -1 : a > b ? 1 : 0);

function newestSeq() {
  let newest = null;
  for (const seq of rows.keys()) if (newest === null || bySeq(seq, newest) > 0) newest = seq;
  return newest;
}

/** Show a row once; a streamed row shows its arrival time until the REST copy brings `created_at`. */
function addRow(row, { fresh = false, fromRest = false } = {}) {
  const known = rows.get(row.seq);
  if (known) {
    if (fromRest) showTime(known.element, row.createdAt);
    return;
  }
  const element = $("message-template").content.firstElementChild.cloneNode(true);
  element.dataset.seq = row.seq;
  element.dataset.event = row.event;
  element.querySelector(".event").textContent = row.event;
  element.querySelector(".seq").textContent = `#${row.seq}`;
  showTime(element, row.createdAt);
  element.querySelector(".data").replaceChildren(highlightJson(row.data));
  element.querySelector(".mark").addEventListener("click", () => markRead([row.seq]));
  if (fresh) {
    element.classList.add("fresh");
    element.addEventListener("animationend", () => element.classList.remove("fresh"), { once: true });
  }
  row.element = element;
  row.arrivedAt = performance.now();
  rows.set(row.seq, row);
  if (row.readAt) showRead(row);
  // Newest first: before the first row with a smaller seq.
  const list = $("messages");
  const after = [...list.children].find((li) => bySeq(li.dataset.seq, row.seq) < 0);
  list.insertBefore(element, after ?? null);
}

function showTime(element, iso) {
  const time = element.querySelector("time");
  time.dateTime = iso;
  time.textContent = formatTime(new Date(iso));
  time.title = new Date(iso).toLocaleString();
}

function showRead(row) {
  row.element.classList.replace("unread", "read");
}

function setRead(seqs) {
  for (const seq of seqs) {
    const row = rows.get(String(seq));
    if (row && !row.readAt) {
      row.readAt = new Date().toISOString();
      showRead(row);
    }
  }
  render();
}

function setReadThrough(through) {
  setRead([...rows.keys()].filter((seq) => bySeq(seq, String(through)) <= 0));
  nextCursor = null; // older unread pages are read now too
  $("more").hidden = true;
}

function render() {
  const unread = [...rows.values()].filter((row) => !row.readAt).length;
  const badge = $("badge");
  badge.dataset.count = String(unread);
  badge.textContent = nextCursor === null ? String(unread) : `${unread}+`;
  document.title = unread ? `(${unread}) pgpush inbox` : "pgpush inbox";
  $("mark-all").disabled = unread === 0 && nextCursor === null;
  $("empty").hidden = rows.size > 0;
}

function formatTime(date) {
  if (Number.isNaN(date.getTime())) return "";
  const sameDay = date.toDateString() === new Date().toDateString();
  const clock = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  return sameDay ? clock : `${date.toLocaleDateString()} ${clock}`;
}

/** Pretty JSON with coloured tokens, built from text nodes (a payload can never inject markup). */
function highlightJson(value) {
  const text = JSON.stringify(value, null, 2) ?? String(value);
  const fragment = document.createDocumentFragment();
  const token = /("(?:\\.|[^"\\])*")(\s*:)?|\b(true|false|null)\b|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/g;
  let last = 0;
  for (const match of text.matchAll(token)) {
    fragment.append(text.slice(last, match.index));
    const span = document.createElement("span");
    span.className = match[1] ? (match[2] ? "j-key" : "j-str") : match[3] ? "j-lit" : "j-num";
    span.textContent = match[1] ?? match[0];
    fragment.append(span, match[2] ?? "");
    last = match.index + match[0].length;
  }
  fragment.append(text.slice(last));
  return fragment;
}

function showNotice(text, level = "info", { sticky = false } = {}) {
  const notice = $("notice");
  notice.hidden = !text;
  notice.textContent = text ?? "";
  notice.dataset.level = level;
  if (sticky) notice.dataset.sticky = "1";
  else delete notice.dataset.sticky;
}

// ---- the stream's status ------------------------------------------------------------------------------

function showStatus(status) {
  const el = $("status");
  el.dataset.state = status.state;
  el.dataset.reconnectAt = status.reconnectAt ? String(status.reconnectAt) : "";
  document.body.dataset.role = status.leader ? "leader" : "follower";
  $("role").textContent = status.leader ? "this tab holds the stream" : "sharing another tab's stream";
  const at = status.reconnectAt ? new Date(status.reconnectAt).toLocaleTimeString() : "";
  const texts = {
    connecting: "connecting…",
    live: "live",
    reconnecting: "reconnecting…",
    paused: `paused, reconnecting at ${at}`,
    down: `server unavailable, retrying at ${at}`,
    expired: "token expired",
    unauthorized: "token rejected",
    closed: "closed",
  };
  $("status-text").textContent = texts[status.state] ?? status.state;
  $("reconnect").hidden = !["paused", "down", "expired"].includes(status.state);
  if (status.state === "expired" || status.state === "unauthorized") {
    const text = `The ${texts[status.state]}: open this page with a new /#token=… to continue.`;
    showNotice(text, "error", { sticky: true });
  } else if ($("notice").dataset.sticky) {
    showNotice(null);
  }
  if (status.state === "live") {
    // After a gap (reconnect, hand-over) re-read the inbox: it covers more than the stream's replay limit.
    if (everLive) loadInbox();
    everLive = true;
  }
}

// ---- start --------------------------------------------------------------------------------------------

async function start() {
  // Pasting /#token=… over an open page only changes the fragment: no load happens, so start over.
  window.addEventListener("hashchange", () => {
    if (new URLSearchParams(location.hash.slice(1)).has("token")) location.reload();
  });
  const fragmentToken = takeTokenFromFragment();
  const session = await signIn(fragmentToken);
  if (!session) {
    $("status").dataset.state = "closed";
    $("status-text").textContent = "no token";
    if (!$("notice").dataset.sticky) {
      const text = "No token: open this page as /#token=<JWT> (for example from `pgpush token --sub alice`).";
      showNotice(text, "error", { sticky: true });
    }
    render();
    $("empty").hidden = true;
    return;
  }
  const sub = session.sub;
  $("user").textContent = sub;
  $("empty-user").textContent = sub || "alice";
  // Another tab signed in as someone else: this one's list and stream belong to the old user.
  inboxChannel?.addEventListener("message", ({ data }) => {
    if (data?.signedIn && data.signedIn !== sub) location.reload();
  });

  let signedInNow = Boolean(fragmentToken);
  stream = connect({
    onMessage: (event) => {
      addRow(
        { seq: event.id, event: event.type, data: event.data, createdAt: new Date().toISOString(), readAt: null },
        { fresh: true },
      );
      render();
    },
    onStatus: (status) => {
      showStatus(status);
      // A new token arrived while the stream (held by another tab) had stopped on the old one.
      if (signedInNow && !status.leader && ["expired", "unauthorized"].includes(status.state)) {
        signedInNow = false;
        stream.reconnect();
      }
    },
    onReset: () => loadInbox({ replace: true }),
  });

  inboxChannel?.addEventListener("message", ({ data }) => {
    if (data?.read) setRead(data.read);
    if (data?.through) {
      setReadThrough(data.through);
      render();
    }
  });
  $("mark-all").addEventListener("click", markAllRead);
  $("more").addEventListener("click", () => loadInbox({ cursor: nextCursor }));
  $("reconnect").addEventListener("click", () => stream.reconnect());
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") loadInbox();
  });
  loadInbox();
}

start();
