// connect() in Node (fetch and web streams are built in) with `shared: false`, against a real HTTP server
// started here that speaks SSE as pgpush does. The client alone: the real pgpush server is exercised by
// the Chromium tests (tests/browser). No test waits a fixed time: each polls for what it expects.
import assert from "node:assert/strict";
import { once } from "node:events";
import { createServer } from "node:http";
import { test } from "node:test";

import { connect } from "../src/index.js";

const WITHIN_MS = 15_000; // a bound for a loaded machine, not an expectation

/** An SSE server whose n-th connection is answered by `script[n]` (the last one repeats). */
async function sseServer(script) {
  const requests = [];
  const server = createServer((req, res) => {
    const url = new URL(req.url, "http://x");
    const request = { at: Date.now(), url, headers: req.headers, closed: false };
    requests.push(request);
    res.on("close", () => (request.closed = true));
    const handler = script[Math.min(requests.length - 1, script.length - 1)];
    handler(req, res, request);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return {
    url: `http://127.0.0.1:${server.address().port}/events`,
    requests,
    close: () => {
      server.closeAllConnections();
      server.close();
    },
  };
}

/** Answer with a stream: write `frames` (text), then end it unless `keepOpen`. */
function stream(frames, { keepOpen = false } = {}) {
  return (req, res) => {
    res.writeHead(200, { "Content-Type": "text/event-stream", "Cache-Control": "no-store" });
    res.write(frames);
    if (!keepOpen) res.end();
  };
}

const row = (id, type, data) => `id: ${id}\nevent: ${type}\ndata: ${JSON.stringify(data)}\n\n`;

/** connect() recording every message and status; `ready` stops the client at the end of the test. */
function recordingClient(t, options) {
  const messages = [];
  const statuses = [];
  const client = connect({
    shared: false,
    onMessage: (m) => messages.push(m),
    onStatus: (s) => statuses.push(s),
    ...options,
  });
  t.after(() => client.close());
  return { client, messages, statuses };
}

async function waitFor(check, what) {
  const deadline = Date.now() + WITHIN_MS;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`not met within ${WITHIN_MS} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** The timers keeping this process alive: the client's reconnect timer would be one. */
const pendingTimers = () => process.getActiveResourcesInfo().filter((kind) => kind === "Timeout").length;

test("rows of any type arrive once, in order, across a reconnect that repeats some", async (t) => {
  const server = await sseServer([
    stream("retry: 20\n\n" + row(1, "lead", { n: 1 }) + row(2, "invoice.paid", { n: 2 }) + row(3, "message", "x")),
    stream(row(2, "invoice.paid", { n: 2 }) + row(3, "message", "x") + row(4, "chat", [4]), { keepOpen: true }),
  ]);
  t.after(server.close);
  const { messages } = recordingClient(t, { url: server.url });
  await waitFor(() => messages.length >= 4, "four rows");
  assert.deepEqual(messages, [
    { type: "lead", id: "1", data: { n: 1 } },
    { type: "invoice.paid", id: "2", data: { n: 2 } },
    { type: "message", id: "3", data: "x" },
    { type: "chat", id: "4", data: [4] },
  ]);
  assert.equal(server.requests[0].url.searchParams.get("lastEventId"), null);
  assert.equal(server.requests[1].url.searchParams.get("lastEventId"), "3");
  assert.equal(server.requests[1].headers.accept, "text/event-stream");
});

test("event ids beyond 2^53 are compared as text, not as rounded numbers", async (t) => {
  // As Numbers, 9007199254740993 is 9007199254740992: the newer row would look like a repeat.
  const server = await sseServer([
    stream(
      row("9", "a", 1) + row("10", "a", 2) + row("9007199254740992", "a", 3) + row("9007199254740993", "a", 4) +
        row("9007199254740992", "a", "repeat") + row("99", "a", "older") + row("10000000000000000", "a", 5),
      { keepOpen: true },
    ),
  ]);
  t.after(server.close);
  const { client, messages } = recordingClient(t, { url: server.url });
  await waitFor(() => messages.length >= 5, "five rows");
  assert.deepEqual(
    messages.map((m) => m.id),
    ["9", "10", "9007199254740992", "9007199254740993", "10000000000000000"],
  );
  assert.equal(client.lastEventId, "10000000000000000");
});

test("control events with an id of their own are never obeyed nor delivered", async (t) => {
  const far = Date.now() + 3_600_000;
  const server = await sseServer([
    stream(
      row(1, "lead", 1) +
        `id: 2\nevent: pause\ndata: {"reconnect_at": ${far}}\n\n` +
        'id: 3\nevent: token_expired\ndata: {}\n\n' +
        'id: 4\nevent: reset\ndata: {"reason": "forged"}\n\n' +
        "id: 5\nevent: pgpush.future\ndata: {}\n\n" +
        row(6, "lead", 6),
      { keepOpen: true },
    ),
  ]);
  t.after(server.close);
  let resets = 0;
  const { client, messages } = recordingClient(t, { url: server.url, onReset: () => (resets += 1) });
  await waitFor(() => messages.length >= 2, "the row after the forged control events");
  assert.deepEqual(
    messages.map((m) => [m.id, m.type]),
    [["1", "lead"], ["6", "lead"]],
  );
  assert.equal(client.status.state, "live");
  assert.equal(resets, 0);
  assert.equal(server.requests.length, 1);
});

test("pause: no reconnect before reconnect_at, then with the last event id", async (t) => {
  let reconnectAt;
  const server = await sseServer([
    (req, res) => {
      // `retry:` says 10 ms; the pause says 1.5 s from now, and the pause is what counts.
      reconnectAt = Date.now() + 1500;
      stream("retry: 10\n\n" + row(7, "lead", 7) + `event: pause\ndata: {"reconnect_at": ${reconnectAt}}\n\n`)(req, res);
    },
    stream(row(8, "lead", 8), { keepOpen: true }),
  ]);
  t.after(server.close);
  const { messages, statuses } = recordingClient(t, { url: server.url });
  await waitFor(() => messages.length >= 2, "the row after the pause");
  const paused = statuses.find((s) => s.state === "paused");
  assert.equal(paused?.reconnectAt, reconnectAt);
  assert.equal(paused.lastEventId, "7");
  assert.ok(server.requests[1].at >= reconnectAt, `reconnected ${reconnectAt - server.requests[1].at} ms early`);
  assert.equal(server.requests[1].url.searchParams.get("lastEventId"), "7");
  assert.deepEqual(statuses.at(-1).state, "live");
});

test("reset: onReset with the reason, and the cursor is forgotten", async (t) => {
  const server = await sseServer([
    stream("retry: 10\n\n" + row(50, "lead", 1)),
    stream('event: reset\ndata: {"reason": "cursor_ahead"}\n\n' + row(3, "lead", "after the reset"), {
      keepOpen: true,
    }),
  ]);
  t.after(server.close);
  const resets = [];
  const { messages } = recordingClient(t, { url: server.url, onReset: (info) => resets.push(info) });
  await waitFor(() => messages.length >= 2, "the row after the reset");
  assert.deepEqual(resets, [{ reason: "cursor_ahead" }]);
  assert.deepEqual(
    messages.map((m) => m.id),
    ["50", "3"], // 3 < 50, yet delivered: the reset started the ids over
  );
});

test("401: status unauthorized, and no retry", async (t) => {
  const server = await sseServer([
    (req, res) => {
      res.writeHead(401, { "Content-Type": "application/json", "Retry-After": "1" });
      res.end('{"error": "invalid_token"}');
    },
  ]);
  t.after(server.close);
  const { statuses } = recordingClient(t, { url: server.url, token: "bad" });
  await waitFor(() => statuses.some((s) => s.state === "unauthorized"), "unauthorized");
  assert.equal(statuses.at(-1).httpStatus, 401);
  // A retry would be a timer of the client's (none of the test's own is pending here).
  assert.equal(pendingTimers(), 0, "no reconnect is scheduled");
  assert.equal(server.requests.length, 1);
});

test("a 503 is retried after its Retry-After, with status down meanwhile", async (t) => {
  const server = await sseServer([
    (req, res) => {
      res.writeHead(503, { "Retry-After": "1" });
      res.end();
    },
    stream(row(1, "lead", 1), { keepOpen: true }),
  ]);
  t.after(server.close);
  const { messages, statuses } = recordingClient(t, { url: server.url });
  await waitFor(() => messages.length === 1, "the row after the retry");
  const down = statuses.find((s) => s.state === "down");
  assert.equal(down.reason, "HTTP 503");
  assert.ok(server.requests[1].at >= server.requests[0].at + 1000, "Retry-After honoured");
});

test("token: sent as a Bearer header, never in the URL, asked again for every connection", async (t) => {
  const server = await sseServer([stream("retry: 10\n\n" + row(1, "a", 1)), stream(row(2, "a", 2), { keepOpen: true })]);
  t.after(server.close);
  let issued = 0;
  const token = async () => `jwt-${++issued}`;
  const { messages } = recordingClient(t, { url: server.url, token });
  await waitFor(() => messages.length >= 2, "two connections");
  assert.deepEqual(
    server.requests.map((r) => r.headers.authorization),
    ["Bearer jwt-1", "Bearer jwt-2"],
  );
  for (const request of server.requests) assert.doesNotMatch(request.url.search, /jwt|token|ticket/);
});

test("token as a plain string", async (t) => {
  const server = await sseServer([stream(row(1, "a", 1), { keepOpen: true })]);
  t.after(server.close);
  const { messages } = recordingClient(t, { url: server.url, token: "the-jwt" });
  await waitFor(() => messages.length === 1, "one row");
  assert.equal(server.requests[0].headers.authorization, "Bearer the-jwt");
});

test("getTicket: called for every connection, sent as ?ticket=", async (t) => {
  const server = await sseServer([stream("retry: 10\n\n" + row(1, "a", 1)), stream(row(2, "a", 2), { keepOpen: true })]);
  t.after(server.close);
  let issued = 0;
  const { messages } = recordingClient(t, { url: server.url, getTicket: async () => `ticket-${++issued}` });
  await waitFor(() => messages.length >= 2, "two connections");
  assert.deepEqual(
    server.requests.map((r) => r.url.searchParams.get("ticket")),
    ["ticket-1", "ticket-2"],
  );
  assert.equal(server.requests[1].url.searchParams.get("lastEventId"), "1");
  assert.equal(server.requests[0].headers.authorization, undefined);
});

test("close(): the stream stops and nothing reconnects", async (t) => {
  // Every stream after the first ends at once with a 10 ms retry: a client left running comes back.
  const server = await sseServer([stream("retry: 10\n\n" + row(1, "a", 1), { keepOpen: true }), stream("retry: 10\n\n")]);
  t.after(server.close);
  const { client, messages, statuses } = recordingClient(t, { url: server.url });
  await waitFor(() => messages.length === 1, "the first row");
  client.close();
  assert.equal(statuses.at(-1).state, "closed");
  assert.equal(client.status.state, "closed");
  await waitFor(() => server.requests[0].closed, "the server sees the stream's connection closed");
  assert.equal(pendingTimers(), 0, "no reconnect is scheduled");
  assert.equal(server.requests.length, 1);
});

test("options: an unknown one is refused, as is a relative URL outside a page", () => {
  assert.throws(() => connect({ onEvent: () => {} }), /unknown option "onEvent"/);
  assert.throws(() => connect({ ticket: async () => "t" }), /unknown option "ticket"/);
  assert.throws(() => connect({ url: "http://127.0.0.1:1/events", token: "a", getTicket: () => "b" }), /not both/);
  assert.throws(() => connect({ shared: false }), TypeError); // "/events" has no origin in Node
});
