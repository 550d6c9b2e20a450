"""The lean event path is the old one, byte for byte: `format_wall` against
strftime over the contract's whole range, `encode_event` against json.dumps of
`event_payload`, and the UUIDv7 generator's RFC 9562 guarantees."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edge.contract.timefmt import WALL_MAX_MS, WALL_MIN_MS, format_ms, format_wall
from edge.events import (
    Abandoned,
    DeviceLost,
    DeviceRef,
    Dropped,
    Event,
    EventBody,
    EventTime,
    OperatorTag,
    Presence,
    Press,
    SurveyAnswer,
    _Uuid7,
    encode_event,
    event_payload,
    new_event_id,
)

ROOT = Path(__file__).resolve().parent.parent


def strftime_wall(wall_ns: int) -> str:
    """format_wall as it was: strftime per call."""
    seconds, ns = divmod(wall_ns, 1_000_000_000)
    stamp = dt.datetime.fromtimestamp(seconds, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{ns // 1_000_000:03d}Z"


def json_dumps_event(event: Event, seq: int, site: str, edge: str) -> bytes:
    """encode_event as it was: json.dumps of the payload dict."""
    return json.dumps(event_payload(event, seq, site, edge), separators=(",", ":"),
                      ensure_ascii=False).encode()


WALL_NS = st.integers(WALL_MIN_MS * 1_000_000, WALL_MAX_MS * 1_000_000 + 999_999)


@given(WALL_NS)
@settings(max_examples=3000)
@example(WALL_MIN_MS * 1_000_000)
@example(WALL_MAX_MS * 1_000_000 + 999_999)
@example(-1)  # the last ns before the epoch: 1969-12-31T23:59:59.999Z
@example(0)
@example(951_782_400_000 * 1_000_000 + 123_456_789)  # 2000-02-29, a leap day
@example(4_107_542_400_000 * 1_000_000 - 1)  # just past 2099: strftime's form kept too
def test_format_wall_is_strftime_over_the_contracts_range(wall_ns: int) -> None:
    assert format_wall(wall_ns) == strftime_wall(wall_ns)


@given(st.integers(-(2**62), 2**62))
@example(WALL_MIN_MS)
@example(WALL_MAX_MS)
@example(-1)
@example(-62_135_596_800_000)  # 0001-01-01T00:00:00.000Z
@example(-62_135_596_800_001)  # the year 0: none
@example(253_402_300_799_999)  # 9999-12-31T23:59:59.999Z
@example(253_402_300_800_000)  # the year 10000: none
@example(-61_000_000_000_000)  # year 36: four digits, as RFC 3339 has it
def test_format_ms_is_datetimes_isoformat_for_years_1_to_9999(ms: int) -> None:
    """The read API's event time: datetime's own RFC 3339 where datetime has
    the instant, None where it has not."""
    try:
        t = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=ms)
    except OverflowError:
        assert format_ms(ms) is None
        return
    assert format_ms(ms) == t.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if WALL_MIN_MS <= ms <= WALL_MAX_MS:
        assert format_ms(ms) == format_wall(ms * 1_000_000)


@given(st.integers(-(2**62), 2**62))
def test_format_wall_outside_the_range_keeps_the_old_form(wall_ns: int) -> None:
    try:
        expected = strftime_wall(wall_ns)
    except (OverflowError, ValueError, OSError):
        with pytest.raises((OverflowError, ValueError, OSError)):
            format_wall(wall_ns)
        return
    assert format_wall(wall_ns) == expected


TEXT = st.text(max_size=40)  # any code point but surrogates: controls, quotes, CJK ...
OPT_TEXT = st.none() | TEXT
INT = st.integers(-(2**63), 2**63)
BODIES: st.SearchStrategy[EventBody] = st.one_of(
    st.builds(Press, button=INT, label=TEXT, score=st.none() | INT, hold=st.booleans()),
    st.builds(SurveyAnswer, record_id=INT, doctor=TEXT, q1=TEXT, q2=OPT_TEXT,
              phone=OPT_TEXT, comment=OPT_TEXT, lang=TEXT),
    st.builds(Presence, record_id=INT, approaches=INT, engaged=INT, period_ms=INT),
    st.builds(Abandoned, record_id=INT, doctor=OPT_TEXT, step=TEXT),
    st.builds(Dropped, from_seq=INT, to_seq=INT, reason=TEXT),
    st.builds(DeviceLost, lost=INT, total=INT, reason=TEXT),
)
EVENTS = st.builds(
    Event, event_id=TEXT, desk=TEXT,
    device=st.builds(DeviceRef, id=TEXT, kind=TEXT, serial=OPT_TEXT), body=BODIES,
    operator=st.builds(OperatorTag, id=OPT_TEXT, source=TEXT),
    time=st.builds(EventTime, wall_ns=WALL_NS, synced=st.booleans(), boot_id=TEXT,
                   mono_ns=INT, age_ms=INT),
    flags=st.lists(TEXT, max_size=4).map(tuple))


@given(EVENTS, INT, TEXT, TEXT)
@settings(max_examples=1500)
def test_encode_event_is_json_dumps_byte_for_byte(event: Event, seq: int, site: str,
                                                  edge: str) -> None:
    assert encode_event(event, seq, site, edge) == json_dumps_event(event, seq, site, edge)


def test_a_lone_surrogate_fails_as_it_did() -> None:
    ev = Event("id", "desk-1", DeviceRef("fc3-1", "console", None), Press(label="\ud800"),
               OperatorTag.nobody(), EventTime(0, False, "b", 0))
    with pytest.raises(UnicodeEncodeError):
        json_dumps_event(ev, 1, "s", "e")
    with pytest.raises(UnicodeEncodeError):
        encode_event(ev, 1, "s", "e")


# -- UUIDv7 --------------------------------------------------------------------

def _parts(text: str) -> tuple[int, int, int]:
    """(ms, version, variant bits) of a UUID string, checking its canonical form."""
    u = uuid.UUID(text)
    assert str(u) == text
    return u.int >> 80, u.version or 0, (u.int >> 62) & 0b11


def test_event_ids_are_uuid7_timed_now_and_strictly_increasing() -> None:
    before = dt.datetime.now(dt.UTC).timestamp() * 1000
    ids = [new_event_id() for _ in range(20_000)]
    after = dt.datetime.now(dt.UTC).timestamp() * 1000
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    for text in (ids[0], ids[-1]):
        ms, version, variant = _parts(text)
        assert version == 7
        assert variant == 0b10
        assert before - 1 <= ms <= after + 1


def test_within_one_millisecond_ids_count_up_in_the_random_bits() -> None:
    gen = _Uuid7()
    now = 1_764_000_000_000 * 1_000_000
    ids = [gen.next(now) for _ in range(10_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    # The timestamp stays true: no millisecond is borrowed for a burst.
    assert {_parts(i)[0] for i in ids} == {now // 1_000_000}
    assert {_parts(i)[1:] for i in ids} == {(7, 0b10)}


def test_a_clock_stepping_back_still_gives_increasing_ids() -> None:
    gen = _Uuid7()
    later = gen.next(2_000_000_000_000 * 1_000_000)
    earlier = gen.next(1_000_000_000_000 * 1_000_000)
    assert earlier > later


def test_a_counter_overflow_borrows_the_next_millisecond() -> None:
    gen = _Uuid7()
    now = 1_764_000_000_000 * 1_000_000
    first = gen.next(now)
    gen._rand = (1 << 74) - 1  # as if this millisecond's counter were at its end
    second = gen.next(now)
    assert second > first
    assert _parts(second)[0] == now // 1_000_000 + 1


def test_a_forked_child_does_not_reuse_the_parents_random_bits() -> None:
    """Parent and child each make ids right after a fork, at the same (fixed)
    time: they share no random bits (with the parent's buffer and counter
    copied into the child they would share all)."""
    script = """
import os, sys, uuid
from edge.events import _UUID7
NOW = 1_764_000_000_000_000_000
_UUID7.next(NOW)  # the random block is read
r, w = os.pipe()
pid = os.fork()
ids = [_UUID7.next(NOW) for _ in range(200)]
low = {uuid.UUID(i).int & ((1 << 62) - 1) for i in ids}
if pid == 0:
    os.write(w, repr(sorted(low)).encode())
    os._exit(0)
os.close(w)
data = b""
while chunk := os.read(r, 65536):
    data += chunk
os.waitpid(pid, 0)
child = set(eval(data.decode()))
print(len(low & child))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "0", out
