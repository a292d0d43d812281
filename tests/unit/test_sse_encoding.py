"""Property tests of the wire format (service/sse.py) against the WHATWG parser of tests/sse_parser.py.

Whatever the data, the event name or the way the bytes are cut into reads, a frame is exactly one event whose
id is the row's seq, whose type is the row's event and whose data parses back to the row's JSON value; no
input can add a field, a line or an event. Cursors are exactly the decimal integers 0 … 2^63-1.
"""

from __future__ import annotations

import codecs
import json
import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pgpush.sse import (
    MAX_CURSOR,
    PING,
    CursorError,
    compact_json,
    control_frame,
    message_frame,
    parse_cursor,
    retry_frame,
)

from tests.sse_parser import Event, EventStreamParser

EVENT_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # docs/protocol.md §1's CHECK on messages.event
# Characters that break naive encoders: line ends, NUL, separators, BOM, NEL, SSE field syntax, JSON syntax.
TRICKY = ["\n", "\r", "\r\n", "\x00", "\u2028", "\u2029", "\ufeff", "\x85", ":", " ", '"', "\\", "\\n", "\t"]
TRICKY += ["data: x", "\n\nid: 666\n\n", "event: evil", "retry: 1", "é", "✓", "😀", "\U0010ffff"]

text = st.lists(st.sampled_from(TRICKY) | st.characters(exclude_categories=("Cs",)), max_size=30).map("".join)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),  # beyond 64 bits, where orjson gives up
    st.floats(allow_nan=False, allow_infinity=False),
    text,
)


def json_of(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: st.lists(children, max_size=5) | st.dictionaries(text, children, max_size=5),
        max_leaves=25,
    )


json_values = json_of(scalars)
# What the service itself puts in control frames: no integer beyond 64 bits.
small_json_values = json_of(st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), text))
event_names = st.from_regex(EVENT_NAME, fullmatch=True)
seqs = st.integers(min_value=1, max_value=MAX_CURSOR)


def as_jsonb_prints(value: Any) -> str:
    """The text Postgres gives for a jsonb value: ", " and ": " between tokens, UTF-8 unescaped."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def parse_in_chunks(stream: bytes, cuts: list[int]) -> tuple[list[Event], EventStreamParser]:
    """Decode and parse `stream` fed in pieces cut at `cuts` (anywhere, even inside a UTF-8 sequence)."""
    parser = EventStreamParser()
    decoder = codecs.getincrementaldecoder("utf-8")()
    events: list[Event] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        events += parser.feed(decoder.decode(stream[start:cut]))
        start = cut
    events += parser.feed(decoder.decode(b"", final=True))
    return events, parser


def cut_points(data: st.DataObject, size: int) -> list[int]:
    return data.draw(st.lists(st.integers(min_value=0, max_value=size), max_size=12), label="cuts")


def escapes_only_control_characters(json_text: str) -> bool:
    """UTF-8 is not escaped: every \\uXXXX in the text is a control character (which JSON must escape)."""
    return all(
        int(escape[1:], 16) < 0x20
        for escape in re.findall(r"\\(u[0-9a-fA-F]{4}|.)", json_text)
        if len(escape) == 5
    )


def no_space_outside_strings(json_text: str) -> bool:
    return not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', '""', json_text))


# --- message frames ------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(value=json_values, event=event_names, seq=seqs, data=st.data())
@example(value="", event="message", seq=1, data=None)
@example(value="line\nbreak\r\nand\rcr\x00nul\u2028\ufeff", event="lead", seq=MAX_CURSOR, data=None)
@example(value={"big": 2**64, "neg": -(2**63) - 1, "f": 1.5}, event="x", seq=7, data=None)
def test_any_json_value_round_trips_as_exactly_one_event(
    value: Any, event: str, seq: int, data: st.DataObject | None
) -> None:
    payload = compact_json(as_jsonb_prints(value))
    frame = message_frame(seq, event, payload)
    assert b"\r" not in frame and frame.count(b"\n") == 4, "id, event, data, blank: nothing more"
    stream = retry_frame(3000) + frame + PING
    events, parser = parse_in_chunks(stream, cut_points(data, len(stream)) if data else [])
    [received] = events
    assert received.type == event
    assert received.last_event_id == str(seq) and received.seq == seq
    assert json.loads(received.data) == value
    assert no_space_outside_strings(received.data)
    assert escapes_only_control_characters(received.data)
    assert parser.retries == [3000] and parser.comments == ["ping"]


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.tuples(json_values, event_names), min_size=1, max_size=6), data=st.data())
def test_consecutive_frames_give_one_event_each_in_order(
    values: list[tuple[Any, str]], data: st.DataObject
) -> None:
    frames = [
        message_frame(seq, event, compact_json(as_jsonb_prints(v)))
        for seq, (v, event) in enumerate(values, 1)
    ]
    stream = retry_frame(1000) + b"".join(frames)
    events, _ = parse_in_chunks(stream, cut_points(data, len(stream)))
    assert [(e.seq, e.type) for e in events] == [(seq, event) for seq, (_, event) in enumerate(values, 1)]
    assert [json.loads(e.data) for e in events] == [v for v, _ in values]


# --- control and retry frames --------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    event=event_names,
    value=st.dictionaries(text, small_json_values, max_size=4),
    retry=st.none() | st.integers(min_value=0, max_value=2**31),
    seq=seqs,
    data=st.data(),
)
def test_a_control_frame_is_one_event_that_keeps_the_last_event_id(
    event: str, value: dict[str, Any], retry: int | None, seq: int, data: st.DataObject
) -> None:
    frame = control_frame(event, value, retry)
    assert b"\r" not in frame and frame.count(b"\n") == (4 if retry is not None else 3)
    stream = message_frame(seq, "message", b"0") + frame
    events, parser = parse_in_chunks(stream, cut_points(data, len(stream)))
    [row, control] = events
    assert control.type == event and json.loads(control.data) == value
    assert control.last_event_id == row.last_event_id == str(seq), "no id: the client's cursor is kept"
    assert parser.retries == ([] if retry is None else [retry])


@given(retry=st.integers(min_value=0, max_value=2**63), data=st.data())
def test_a_retry_frame_sets_the_reconnection_time_and_dispatches_nothing(
    retry: int, data: st.DataObject
) -> None:
    stream = retry_frame(retry)
    events, parser = parse_in_chunks(stream, cut_points(data, len(stream)))
    assert events == [] and parser.retries == [retry]


# --- compact JSON --------------------------------------------------------------------------------------


@given(value=json_values)
def test_compact_json_is_idempotent_and_one_line(value: Any) -> None:
    once = compact_json(as_jsonb_prints(value))
    assert compact_json(once.decode()) == once
    assert b"\n" not in once and b"\r" not in once


@pytest.mark.parametrize("depth", [254, 255, 1024, 1025, 5000])
def test_compact_json_keeps_any_nesting_depth(depth: int) -> None:
    """orjson writes at most 254 levels and reads at most 1024; deeper values must still encode."""
    assert compact_json("[ " * depth + "1" + " ]" * depth) == b"[" * depth + b"1" + b"]" * depth


@pytest.mark.parametrize(
    "number", ["123456789012345678901234567890", "-18446744073709551617", "1" + "0" * 400]
)
def test_integers_beyond_64_bits_are_kept_digit_for_digit(number: str) -> None:
    assert compact_json(f'{{"n": {number}, "s": "a b"}}') == f'{{"n":{number},"s":"a b"}}'.encode()


@pytest.mark.parametrize(
    "number",
    ["0.1000000000000000000001", "-3.14159265358979323846", "0." + "0" * 399 + "1", "1234567890.123456"],
)
def test_decimals_beyond_double_precision_are_kept_digit_for_digit(number: str) -> None:
    """jsonb keeps numerics exactly (and never prints an exponent); the stream must not round them."""
    assert compact_json(f"[{number}, 1.5]") == f"[{number},1.5]".encode()


@pytest.mark.parametrize(
    "number", ["1795323295398.415", "-1795323295398.4155", "123456789012345678", "18446744073709551615"]
)
def test_long_numbers_keep_their_text_whichever_path_encodes_them(number: str) -> None:
    """Epoch milliseconds with a fraction, 18-digit ids: orjson holds some exactly, others go the slow way."""
    assert compact_json(f'{{"t": {number}, "s": "a, b: c"}}') == f'{{"t":{number},"s":"a, b: c"}}'.encode()


@given(
    st.integers(min_value=0, max_value=10**30),
    st.integers(min_value=0, max_value=40),
    st.booleans(),
)
def test_any_jsonb_numeric_keeps_its_value(mantissa: int, scale: int, negative: bool) -> None:
    """Numbers as jsonb prints numerics (plain decimal notation, any precision) keep their exact value."""
    digits = str(mantissa).rjust(scale + 1, "0")
    number = ("-" if negative else "") + (f"{digits[:-scale]}.{digits[-scale:]}" if scale else digits)
    assert Decimal(json.loads(compact_json(f"[{number}]"), parse_float=Decimal)[0]) == Decimal(number)


# --- cursors -------------------------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=MAX_CURSOR), st.integers(min_value=0, max_value=MAX_CURSOR))
def test_every_cursor_in_range_is_accepted_and_the_header_wins(header: int, query: int) -> None:
    assert parse_cursor(str(header), None) == header
    assert parse_cursor(None, str(query)) == parse_cursor("", str(query)) == query
    assert parse_cursor(str(header), str(query)) == header


@given(st.integers(min_value=MAX_CURSOR + 1) | st.integers(max_value=-1))
def test_integers_outside_the_range_are_refused(value: int) -> None:
    for header, query in ((str(value), None), (None, str(value))):
        with pytest.raises(CursorError):
            parse_cursor(header, query)


@settings(max_examples=300)
@given(st.text(min_size=1, max_size=25) | st.text(st.characters(categories=("Nd",)), min_size=1, max_size=5))
@example("٣")  # an Arabic-Indic digit: int() accepts it, a cursor must not
@example("\uff11\uff12")  # fullwidth digits
@example("1_000")
@example("+1")
@example(" 1")
@example("00000000000000000000001")
def test_a_cursor_is_accepted_exactly_when_it_is_ascii_decimal_digits_in_range(value: str) -> None:
    digits = value.isascii() and value.isdigit()
    valid = digits and int(value) <= MAX_CURSOR  # zero padding does not matter, the value does
    try:
        parsed = parse_cursor(value, None)
    except CursorError:
        assert not valid, f"{value!r} was refused"
    else:
        assert valid and parsed == int(value), f"{value!r} was accepted as {parsed}"


def test_no_cursor_is_none() -> None:
    assert parse_cursor(None, None) is None
    assert parse_cursor("", "") is None
