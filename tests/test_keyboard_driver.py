"""Keyboard-class buttons and badge readers: boot reports, key maps, scans."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.keyboard import (
    BadgeDecoder,
    BadgeScan,
    BootDecoder,
    ButtonMap,
    KeyPress,
    usage_char,
)


def report(*usages: int, mods: int = 0) -> bytes:
    keys = list(usages) + [0] * (6 - len(usages))
    return bytes([mods, 0, *keys])


# A macro pad pressed: '1', release, '2' and '3' together (rollover error in
# between while both are held), release, an unmapped 'x'.
CAPTURE = [
    (report(0x1E), 0), (report(), 80), (report(0x1F), 200), (report(0x1F, 0x20), 230),
    (bytes([0, 0, 1, 1, 1, 1, 1, 1]), 240), (report(0x1F, 0x20), 250), (report(), 330),
    (report(0x1B), 400), (report(), 450), (b"\x00\x00\x1e", 500),
]
EXPECTED = [(0x1E, 0), (0x1F, 200), (0x20, 230), (0x1B, 400)]


def _run(chunks: list[tuple[bytes, int]]) -> tuple[list[tuple[int, int]], dict[str, int]]:
    dec = BootDecoder()
    keys = [(k.usage, k.at_ms) for data, at in chunks for k in dec.feed(data, at)]
    return keys, dec.errors


def test_golden_capture_presses_not_releases_and_rollover_ignored() -> None:
    keys, errors = _run(CAPTURE)
    assert keys == EXPECTED
    assert errors == {"rollover": 1, "bad_length": 1}


def test_button_map_labels_and_counts_unmapped() -> None:
    m = ButtonMap({0x1E: ("good", 1), 0x1F: ("neutral", 0), 0x20: ("bad", -1)})
    presses = [m.press(KeyPress(u, t)) for u, t in EXPECTED]
    assert [(p.label, p.score) if p else None for p in presses] == \
        [("good", 1), ("neutral", 0), ("bad", -1), None]
    assert m.unmapped == 1


def _type(badge: str, start: int, gap: int = 20) -> list[KeyPress]:
    usage = {usage_char(u): u for u in range(0x04, 0x28)}
    keys = [KeyPress(usage[c], start + i * gap) for i, c in enumerate(badge)]
    return [*keys, KeyPress(0x28, start + len(badge) * gap)]


def test_badge_scan_typed_then_enter() -> None:
    dec = BadgeDecoder()
    scans = [s for k in _type("04A7F3", 1000) if (s := dec.feed(k))]
    assert scans == [BadgeScan("04A7F3", 1120)]
    assert "04A7F3" not in repr(scans[0])


def test_a_gap_over_100ms_is_a_partial_scan_and_the_late_key_starts_again() -> None:
    dec = BadgeDecoder()
    keys = _type("1234", 0)
    keys[2] = KeyPress(keys[2].usage, 250)  # the reader hiccups
    keys[3] = KeyPress(keys[3].usage, 260)
    keys[4] = KeyPress(0x28, 270)
    assert [s for k in keys if (s := dec.feed(k))] == []
    assert dec.errors == {"partial_scan": 1, "bad_scan": 1}


def test_a_scan_that_never_ends_expires_as_partial() -> None:
    dec = BadgeDecoder()
    for k in _type("998877", 0)[:-1]:
        dec.feed(k)
    dec.expire(1000)
    assert dec.errors == {"partial_scan": 1}
    assert [s for k in _type("5555", 2000) if (s := dec.feed(k))] == [BadgeScan("5555", 2080)]


@settings(max_examples=500)
@given(st.lists(st.tuples(st.binary(min_size=0, max_size=12), st.integers(0, 10_000)),
                max_size=40))
def test_random_reports_never_raise_and_never_repeat_a_held_key(
        chunks: list[tuple[bytes, int]]) -> None:
    dec = BootDecoder()
    badge = BadgeDecoder()
    for data, at in chunks:
        pressed = dec.feed(data, at)
        assert len({k.usage for k in pressed}) == len(pressed)
        assert all(k.usage > 3 for k in pressed)
        for k in pressed:
            badge.feed(k)
