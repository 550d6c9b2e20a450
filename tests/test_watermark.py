"""The collector's ack watermark and gap list, as pure functions: no database."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from collector.store import advance_watermark, missing_ranges


def test_moves_over_consecutive_committed_seqs_and_stops_at_the_first_missing() -> None:
    assert advance_watermark(0, [1, 2, 3, 5], []) == 3
    assert advance_watermark(3, [5], []) == 3
    assert advance_watermark(3, [4, 5], []) == 5


def test_jumps_over_a_declared_dropped_range_that_covers_the_next_seq() -> None:
    # The collector's own case: 1, 2, 4 committed, 3 declared dropped by event 5.
    assert advance_watermark(0, [1, 2, 4, 5], [(3, 3)]) == 5
    assert advance_watermark(0, [], [(1, 10)]) == 10
    assert advance_watermark(0, [11, 12], [(1, 10)]) == 12
    # A range that does not reach the next seq does not help.
    assert advance_watermark(0, [1], [(3, 9)]) == 1


def test_overlapping_ranges_and_seqs_below_the_watermark() -> None:
    assert advance_watermark(0, [], [(2, 5), (1, 3)]) == 5
    assert advance_watermark(5, [1, 2, 3], [(1, 4)]) == 5
    assert advance_watermark(5, [6, 6, 7], []) == 7  # duplicate seqs (another event id)


def test_input_order_does_not_matter() -> None:
    assert advance_watermark(0, [4, 2, 1, 5], [(3, 3)]) == 5


def test_never_goes_back() -> None:
    assert advance_watermark(9, [1, 2], [(1, 5)]) == 9


def test_missing_ranges_between_watermark_and_max_seq() -> None:
    assert missing_ranges(5, 7, {7}, [(3, 3)]) == [(6, 6)]
    assert missing_ranges(0, 10, {1, 2, 6}, [(4, 4)]) == [(3, 3), (5, 5), (7, 10)]
    assert missing_ranges(0, 10, set(), [(1, 10)]) == []
    assert missing_ranges(7, 7, set(), []) == []


def _covered(seqs: list[int], ranges: list[tuple[int, int]]) -> set[int]:
    return set(seqs) | {q for a, b in ranges for q in range(a, b + 1)}


_seqs = st.lists(st.integers(1, 60), max_size=40)
_ranges = st.lists(st.tuples(st.integers(1, 60), st.integers(0, 15)).map(
    lambda t: (t[0], t[0] + t[1])), max_size=5)


@given(st.integers(0, 30), _seqs, _ranges)
def test_watermark_is_the_end_of_the_covered_run_after_the_old_one(
        old: int, seqs: list[int], ranges: list[tuple[int, int]]) -> None:
    covered = _covered(seqs, ranges)
    expected = old
    while expected + 1 in covered:
        expected += 1
    assert advance_watermark(old, seqs, ranges) == expected


@given(st.integers(0, 30), st.integers(0, 80), _seqs, _ranges)
def test_missing_ranges_are_the_uncovered_runs(
        wm: int, top: int, seqs: list[int], ranges: list[tuple[int, int]]) -> None:
    covered = _covered(seqs, ranges)
    got = missing_ranges(wm, top, set(seqs), ranges)
    listed = [q for a, b in got for q in range(a, b + 1)]
    assert listed == [q for q in range(wm + 1, top + 1) if q not in covered]
    # Maximal runs: two listed ranges never touch.
    assert all(b + 1 < a for (_, b), (a, _) in pairwise(got))
