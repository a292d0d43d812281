"""An independent event-stream parser following the WHATWG rules (HTML §9.2.6), for the tests only."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Event:
    """A dispatched event, with the stream's last-event-id and reconnection time at that moment."""

    type: str
    data: str
    last_event_id: str
    retry: int | None = None

    @property
    def seq(self) -> int:
        return int(self.last_event_id)


@dataclass
class EventStreamParser:
    """Feed it decoded text in any chunking; it returns dispatched events, comments and retry values."""

    last_event_id: str = ""
    retry: int | None = None
    comments: list[str] = field(default_factory=list)
    retries: list[int] = field(default_factory=list)
    _buffer: str = ""
    _data: list[str] = field(default_factory=list)
    _type: str = ""
    _pending_cr: bool = False
    _seen_bom: bool = False

    def feed(self, text: str) -> list[Event]:
        if not self._seen_bom and text:
            self._seen_bom = True
            text = text.removeprefix("\ufeff")
        events: list[Event] = []
        if self._pending_cr and text.startswith("\n"):
            text = text[1:]
        self._pending_cr = False
        self._buffer += text
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                break
            line, end = self._buffer[: cut[0]], cut[1]
            if cut[2] and end == len(self._buffer):
                self._pending_cr = True  # a CR at the end of a chunk may be followed by LF in the next
            self._buffer = self._buffer[end:]
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> Event | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:].removeprefix(" "))
            return None
        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
            self.retries.append(self.retry)
        return None

    def _dispatch(self) -> Event | None:
        data, event_type = self._data, self._type
        self._data, self._type = [], ""
        if not data:
            return None
        return Event(event_type or "message", "\n".join(data), self.last_event_id, self.retry)


def _line_end(buffer: str) -> tuple[int, int, bool] | None:
    """(end of line, start of next line, ended by a lone CR) for the first complete line."""
    for i, ch in enumerate(buffer):
        if ch == "\n":
            return i, i + 1, False
        if ch == "\r":
            if i + 1 < len(buffer):
                return i, i + (2 if buffer[i + 1] == "\n" else 1), False
            return i, i + 1, True
    return None
