// The parts of the client that need no server: the SSE parser (WHATWG HTML, "Server-sent events") and
// the names of pgpush's control events.
import assert from "node:assert/strict";
import { test } from "node:test";

import { isControl, readEvents } from "../src/index.js";

/** A body delivering `chunks` (strings, or bytes to split multi-byte characters) one read at a time. */
function body(chunks) {
  const encoder = new TextEncoder();
  return new ReadableStream({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(typeof chunk === "string" ? encoder.encode(chunk) : chunk);
      controller.close();
    },
  });
}

async function parse(chunks) {
  const frames = [];
  const retries = [];
  await readEvents(
    body(chunks),
    (frame) => frames.push(frame),
    (ms) => retries.push(ms),
  );
  return { frames, retries };
}

test("LF, CRLF and CR all end lines, mixed in one stream", async () => {
  const { frames } = await parse(["id: 1\nevent: a\ndata: x\n\n", "id: 2\r\nevent: b\r\ndata: y\r\n\r\n", "id: 3\revent: c\rdata: z\r\r"]);
  assert.deepEqual(frames, [
    { event: "a", data: "x", id: "1" },
    { event: "b", data: "y", id: "2" },
    { event: "c", data: "z", id: "3" },
  ]);
});

test("a CR ending one chunk and the LF starting the next are one line end, not two", async () => {
  // Read as two line ends, "\r" + "\n" would end the event after `event: a` and lose its data.
  const { frames } = await parse(["event: a\r", "\ndata: x\r", "\n\r", "\n"]);
  assert.deepEqual(frames, [{ event: "a", data: "x", id: null }]);
});

test("a field split across chunks, and a character split across its bytes", async () => {
  const bytes = new TextEncoder().encode('data: {"name": "Zoë"}\n\n');
  const split = bytes.indexOf(0xc3) + 1; // inside the two bytes of ë
  const { frames } = await parse(["da", "ta: par", "tial\n", "\n", bytes.slice(0, split), bytes.slice(split)]);
  assert.deepEqual(frames, [
    { event: "message", data: "partial", id: null },
    { event: "message", data: '{"name": "Zoë"}', id: null },
  ]);
});

test("comments and heartbeats are skipped; data lines join with LF; one leading space is dropped", async () => {
  const { frames } = await parse([": ping\n\n", "event: note\n: a comment\ndata:  two spaces\ndata:line\ndata\n\n"]);
  assert.deepEqual(frames, [{ event: "note", data: " two spaces\nline\n", id: null }]);
});

test("an event without data is not dispatched; an unknown field is ignored", async () => {
  const { frames } = await parse(["event: empty\nid: 7\n\n", "event: x\nfoo: bar\ndata: 1\n\n"]);
  assert.deepEqual(frames, [{ event: "x", data: "1", id: null }]);
});

test("an id containing NUL is ignored; the id is the event's own, null without one", async () => {
  const { frames } = await parse(["id: 5\0\ndata: a\n\n", "data: b\n\n", "id: 6\ndata: c\n\n"]);
  assert.deepEqual(
    frames.map((f) => f.id),
    [null, null, "6"],
  );
});

test("retry: takes digits only", async () => {
  const { frames, retries } = await parse(["retry: 1500\n", "retry: 2x\nretry: -1\nretry:250\ndata: d\n\n"]);
  assert.deepEqual(retries, [1500, 250]);
  assert.equal(frames.length, 1);
});

test("an unterminated last event is dropped (the connection ended inside it)", async () => {
  const { frames } = await parse(["data: whole\n\n", "id: 9\ndata: half"]);
  assert.deepEqual(frames, [{ event: "message", data: "whole", id: null }]);
});

test("isControl: pgpush's own names, and nothing else", () => {
  for (const name of ["pause", "reset", "token_expired", "pgpush", "pgpush.future", "pgpush_x"]) {
    assert.equal(isControl(name), true, name);
  }
  for (const name of ["message", "lead", "reset_password", "Pause", "paused", "my-pgpush", ""]) {
    assert.equal(isControl(name), false, name);
  }
});
