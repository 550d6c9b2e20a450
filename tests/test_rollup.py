"""The dashboards' kept press counts (`collector.rollup`) equal the counts of the raw
rows (`reports.press_counts`, what `feedback-collector report` computes), on a real
SQLite file and a real PostgreSQL: after the first refresh, after late events and
anchors, and when two refreshes run at once beside intake."""

from __future__ import annotations

import json
import random
import threading
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from collector import queries, reports, rollup, store
from collector.db import Database
from collector.intake import classify
from collector.store import Item
from tests.collector_fixtures import Backend, press_event

TZ = "Europe/Berlin"
YEAR_10000_MS = 253_402_300_800_000
# Around both of 2026's DST changes in Berlin (29 March, 25 October).
DAYS = [date(2026, 3, 27) + timedelta(days=i) for i in range(4)] + \
    [date(2026, 10, 21) + timedelta(days=i) for i in range(8)]
LABELS = {"good": (0, 1), "neutral": (1, 0), "bad": (2, -1), "4": (3, 4), "2": (4, 2)}


def local_ns(day: date, hour: int, minute: int, second: int = 0, fold: int = 0) -> int:
    t = datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=ZoneInfo(TZ),
                 fold=fold)
    return int(t.timestamp()) * 10**9


class Edges:
    """Events per edge in time order, numbered as the edge numbers them."""

    def __init__(self) -> None:
        self.specs: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
        self.seqs: dict[tuple[str, str], int] = {}

    def add(self, site: str, edge: str, real_ns: int, **kw: Any) -> None:
        self.specs.setdefault((site, edge), []).append((real_ns, kw))

    def messages(self) -> list[tuple[str, bytes]]:
        out = []
        for (site, edge), specs in sorted(self.specs.items()):
            for real_ns, kw in sorted(specs, key=lambda s: s[0]):
                seq = self.seqs[(site, edge)] = self.seqs.get((site, edge), 0) + 1
                kw.setdefault("wall_ns", real_ns)
                out.append(press_event(seq, site=site, edge=edge, **kw))
        self.specs.clear()
        return out


def press(edges: Edges, site: str, edge: str, real_ns: int, label: str, **kw: Any) -> None:
    button, score = LABELS[label]
    edges.add(site, edge, real_ns, label=label, score=score, button=button, **kw)


def ingest(db: Database, msgs: list[tuple[str, bytes]], now_ms: int | None = None) -> None:
    items = [classify(t, p) for t, p in msgs]
    assert all(isinstance(i, Item) and i.kind != "quarantine" for i in items)
    res = store.ingest(db, [i for i in items if i is not None], now_ms=now_ms)
    assert res.quarantined == 0


def anchor(site: str, edge: str, boot_id: str, mono_ns: int, wall: datetime
           ) -> tuple[str, bytes]:
    return (f"feedback/v1/{site}/{edge}/timesync", json.dumps(
        {"boot_id": boot_id, "mono_ns": mono_ns, "reason": "synchronised",
         "wall": wall.astimezone(ZoneInfo("UTC")).strftime("%Y-%m-%dT%H:%M:%S.000Z")}
    ).encode())


def dataset(db: Database) -> None:
    """Presses with every rule at work: HOLDs, test pairs (one across midnight),
    bursts, five-point labels, nobody on duty, both DST days (the repeated 02:30),
    unsynchronised presses corrected by an anchor and one never corrected (1970),
    and rows whose time is out of range."""
    rnd = random.Random(7)
    e = Edges()
    for day in DAYS:
        for _ in range(60):
            hour = rnd.choice((0, 1, 2, 3, 8, 9, 12, 17, 22, 23))
            t = local_ns(day, hour, rnd.randrange(60), rnd.randrange(60),
                         fold=rnd.randrange(2))
            site, edge = rnd.choice((("clinic-3", "reception-1"), ("clinic-3", "reception-2"),
                                     ("clinic-4", "reception-1")))
            label = rnd.choice(tuple(LABELS))
            kind = rnd.random()
            kw: dict[str, Any] = {"desk": rnd.choice(("desk-1", "desk-2")),
                                  "operator": rnd.choice(("op-anna", "op-boris", None))}
            if kind < 0.05:
                kw["flags"] = ("burst",)
            elif kind < 0.1:
                kw["hold"] = True
            press(e, site, edge, t, label, **kw)
            if 0.1 <= kind < 0.16:  # an installer's test: the PRESS, then the HOLD
                press(e, site, edge, t + 3 * 10**9, label, hold=True, flags=("test",), **kw)
    # A test pair across midnight, the only presses of its operator.
    press(e, "clinic-4", "reception-2", local_ns(date(2026, 10, 23), 23, 59, 50), "bad",
          operator="op-midnight")
    press(e, "clinic-4", "reception-2", local_ns(date(2026, 10, 24), 0, 0, 20), "bad",
          operator="op-midnight", hold=True, flags=("test",))
    # Unsynchronised: boot-u is corrected by its anchor (to 26 October, 09:00 on),
    # boot-v never is (1970).
    base = local_ns(date(2026, 10, 26), 9, 0)
    for i in range(5):
        press(e, "clinic-3", "reception-1", base + i * 60 * 10**9, "good", synced=False,
              boot_id="boot-u", wall_ns=(100 + i * 60) * 10**9, mono_ns=(100 + i * 60) * 10**9,
              operator="op-unsynced")
        press(e, "clinic-3", "reception-2", base + i * 60 * 10**9, "bad", synced=False,
              boot_id="boot-v", wall_ns=(100 + i * 60) * 10**9, mono_ns=(100 + i * 60) * 10**9)
    msgs = e.messages()
    msgs.append(anchor("clinic-3", "reception-1", "boot-u", 100 * 10**9,
                       datetime(2026, 10, 26, 9, 0, tzinfo=ZoneInfo(TZ))))
    ingest(db, msgs)
    with db.transaction() as cur:  # what a database from before the range was checked holds
        cur.execute("UPDATE events SET wall_ms = ? WHERE site = 'clinic-4' AND seq IN (5, 9)",
                    (YEAR_10000_MS,))


def check(db: Database, start: date, end: date) -> reports.PressCounts:
    """The kept counts of start..end equal the raw rows' counts, and so every figure."""
    kept = rollup.counts(db, TZ, start, end)
    rows = queries.report_events(db, ["press"], start, end)
    raw = reports.press_counts(rows, TZ, start, end)
    assert dict(kept.groups) == dict(raw.groups), (start, end)
    assert dict(kept.hours) == dict(raw.hours), (start, end)
    for burst in (False, True):
        for by in ("operator", "desk", "site"):
            for period in reports.PERIODS:
                assert reports.loyalty_from_counts(
                    kept, by=by, period=period, start=start, end=end, include_burst=burst) == \
                    reports.loyalty_index(rows, by=by, period=period, tz=TZ, start=start,
                                          end=end, include_burst=burst)
        assert reports.bad_by_time_from_counts(kept, include_burst=burst) == \
            reports.bad_presses_by_time(rows, tz=TZ, start=start, end=end,
                                        include_burst=burst)
    return kept


def check_all(db: Database) -> None:
    for day in [*DAYS, date(1970, 1, 1)]:
        check(db, day, day)
    check(db, DAYS[0], DAYS[-1])
    check(db, date(1970, 1, 1), DAYS[-1])


def pending(db: Database) -> int:
    return int(db.query("SELECT COUNT(*) FROM rollup_days WHERE presses < 0")[0][0])


def test_the_kept_counts_equal_the_raw_rows_figures(backend: Backend) -> None:
    db = backend.open()
    try:
        dataset(db)
        assert rollup.refresh(db, TZ) >= len(DAYS)
        assert pending(db) == 0
        check_all(db)
        # The rules were at work: the pair across midnight is not counted on either
        # day, even with a range ending before its HOLD; the corrected presses are
        # on their real day, the uncorrected ones in 1970; the far ones nowhere.
        for start, end in ((date(2026, 10, 23), date(2026, 10, 23)),
                           (date(2026, 10, 23), date(2026, 10, 24))):
            assert not [k for k in check(db, start, end).groups if k[2] == "op-midnight"]
        oct26 = check(db, date(2026, 10, 26), date(2026, 10, 26))
        assert sum(n for k, n in oct26.groups.items() if k[2] == "op-unsynced") == 5
        assert sum(check(db, date(1970, 1, 1), date(1970, 1, 1)).groups.values()) == 5
        total = sum(check(db, date(1970, 1, 1), DAYS[-1]).groups.values())
        everything = queries.report_events(db, ["press"], None, None)
        assert reports.out_of_range(everything) == 2
        assert total == sum(reports.press_counts(everything, TZ).groups.values())
        assert {k[4] for k in oct26.groups} == {"good", "neutral", "bad"}
        assert any(k[5] for k in oct26.groups) or any(
            k[5] for d in DAYS for k in check(db, d, d).groups)  # bursts kept apart
        # Nothing new: a page load's refresh writes nothing.
        assert rollup.refresh(db, TZ) == 0
    finally:
        db.close()


def test_late_events_and_anchors_change_their_old_days_at_the_next_refresh(
        backend: Backend) -> None:
    db = backend.open()
    try:
        dataset(db)
        rollup.refresh(db, TZ)
        oct22 = check(db, date(2026, 10, 22), date(2026, 10, 22))
        oct23 = check(db, date(2026, 10, 23), date(2026, 10, 23))
        (mark,), = db.query("SELECT received_ms FROM rollup_state WHERE tz = ?", (TZ,))
        # A press at the lone edge just before midnight, counted.
        e = Edges()
        e.seqs[("clinic-9", "reception-1")] = 0
        press(e, "clinic-9", "reception-1", local_ns(date(2026, 10, 22), 23, 58), "good",
              operator="op-late")
        ingest(db, e.messages(), now_ms=mark + 1000)
        rollup.refresh(db, TZ)
        assert check(db, date(2026, 10, 22), date(2026, 10, 22)) != oct22
        # Later, replayed after an outage: its test HOLD after midnight (cancelling
        # it on the 22nd), a press for the 23rd, and one whose transaction committed
        # late (received before the last refresh's high-water mark).
        press(e, "clinic-9", "reception-1", local_ns(date(2026, 10, 23), 0, 3), "good",
              operator="op-late", hold=True, flags=("test",))
        press(e, "clinic-9", "reception-1", local_ns(date(2026, 10, 23), 10, 0), "bad",
              operator="op-late")
        ingest(db, e.messages(), now_ms=mark + 2000)
        press(e, "clinic-9", "reception-1", local_ns(date(2026, 10, 23), 11, 0), "bad",
              operator="op-late")
        ingest(db, e.messages(), now_ms=mark - 10 * 60 * 1000)
        # Unsynchronised presses of a new boot, then its anchor: from 1970 to the 21st.
        press(e, "clinic-9", "reception-1", local_ns(date(2026, 10, 21), 15, 0), "neutral",
              synced=False, boot_id="boot-w", wall_ns=50 * 10**9, mono_ns=50 * 10**9)
        ingest(db, e.messages(), now_ms=mark + 3000)
        rollup.refresh(db, TZ)
        assert sum(check(db, date(1970, 1, 1), date(1970, 1, 1)).groups.values()) == 6
        ingest(db, [anchor("clinic-9", "reception-1", "boot-w", 50 * 10**9,
                           datetime(2026, 10, 21, 15, 0, tzinfo=ZoneInfo(TZ)))],
               now_ms=mark + 4000)
        assert rollup.refresh(db, TZ) > 0
        assert pending(db) == 0
        check_all(db)
        assert check(db, date(2026, 10, 22), date(2026, 10, 22)) == oct22  # cancelled
        late23 = check(db, date(2026, 10, 23), date(2026, 10, 23))
        assert sum(late23.groups.values()) == sum(oct23.groups.values()) + 2
        assert sum(check(db, date(1970, 1, 1), date(1970, 1, 1)).groups.values()) == 5
        assert ("clinic-9", "desk-1", "op-1", date(2026, 10, 21), "neutral", False) in \
            check(db, date(2026, 10, 21), date(2026, 10, 21)).groups
        assert rollup.refresh(db, TZ) == 0
    finally:
        db.close()


def test_two_refreshes_at_once_beside_intake_count_every_press_once(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rollup, "DAYS_PER_BATCH", 1)  # many turns to interleave
    db = backend.open()
    try:
        dataset(db)

        def both(extra: Any = None) -> None:
            start = threading.Barrier(3 if extra else 2)
            errors: list[BaseException] = []

            def run(fn: Any) -> None:
                try:
                    start.wait(30)
                    fn()
                except BaseException as e:  # the test asserts there were none
                    errors.append(e)

            def refresher() -> None:
                mine = backend.open()
                try:
                    for _ in range(3):
                        rollup.refresh(mine, TZ)
                finally:
                    mine.close()

            threads = [threading.Thread(target=run, args=(refresher,)) for _ in range(2)]
            if extra:
                threads.append(threading.Thread(target=run, args=(extra,)))
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            assert not errors, errors

        both()
        assert pending(db) == 0
        check_all(db)

        def intake() -> None:
            mine = backend.open()
            rnd = random.Random(3)
            e = Edges()
            e.seqs[("clinic-7", "reception-1")] = 0
            try:
                for _ in range(20):
                    for _ in range(10):
                        day = rnd.choice(DAYS)
                        press(e, "clinic-7", "reception-1",
                              local_ns(day, rnd.randrange(24), rnd.randrange(60)),
                              rnd.choice(tuple(LABELS)))
                    ingest(mine, e.messages())
            finally:
                mine.close()

        both(intake)
        rollup.refresh(db, TZ)
        assert pending(db) == 0
        check_all(db)
        seven = check(db, DAYS[0], DAYS[-1])
        assert sum(n for k, n in seven.groups.items() if k[0] == "clinic-7") > 150
    finally:
        db.close()
