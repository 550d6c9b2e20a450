"""The publishing state machine on a fake clock: window, seq order, PUBACK
reason codes, the refusal probe and back-off, batched deletions, and the
collector delivery mode (watermark, pause, bound, resend).  No broker, no
waiting: `now` is passed in."""

from __future__ import annotations

from edge.publisher import REJECT_RETRY_S, REMOVE_BATCH, REMOVE_DELAY_S, Publisher


class Outbox:
    """Stored seqs and a fake link: what the daemon's _pump does, in memory."""

    def __init__(self, pub: Publisher, seqs: range) -> None:
        self.pub = pub
        self.stored = list(seqs)
        self.next_mid = 1
        self.sent: list[tuple[int, int]] = []  # (mid, seq) in the order handed to the link

    def pump(self, now: float) -> list[int]:
        out: list[int] = []
        while (want := self.pub.wants(now)) is not None:
            batch = [q for q in self.stored if q > want.after and q not in want.skip]
            batch = batch[:want.room]
            if not batch:
                break
            for q in batch:
                self.pub.sent(self.next_mid, q)
                self.sent.append((self.next_mid, q))
                out.append(q)
                self.next_mid += 1
        return out

    def mid_of(self, seq: int) -> int:
        return next(m for m, q in reversed(self.sent) if q == seq)

    def ack(self, seq: int, now: float, ok: bool = True) -> None:
        assert self.pub.on_puback(self.mid_of(seq), ok, "Success" if ok else "Not authorized",
                                  now)


def test_window_is_the_smaller_of_config_and_receive_maximum_and_order_is_seq() -> None:
    pub = Publisher(20)
    box = Outbox(pub, range(1, 51))
    pub.connected(receive_maximum=5)
    assert box.pump(0.0) == [1, 2, 3, 4, 5]
    box.ack(1, 0.0)
    box.ack(2, 0.0)
    assert box.pump(0.0) == [6, 7]
    pub.connected(receive_maximum=0)  # a broker saying 0 still gets one in flight
    assert pub.window == 1


def test_a_puback_for_a_non_event_is_not_taken_for_an_event() -> None:
    pub = Publisher(5)
    assert pub.on_puback(999, True, "Success", 0.0) is False
    assert pub.acked == 0


def test_refused_event_is_retried_after_back_off_one_at_a_time_and_nothing_overtakes() -> None:
    pub = Publisher(5)
    box = Outbox(pub, range(1, 11))
    assert box.pump(0.0) == [1, 2, 3, 4, 5]
    box.ack(1, 0.0)
    for q in (2, 3, 4, 5):  # the broker refuses from seq 2 on (PUBACK 0x87)
        box.ack(q, 0.1, ok=False)
    assert pub.rejected == {"Not authorized": 4}
    assert pub.delivered == [1]
    # Nothing goes out before the first back-off step has passed.
    assert box.pump(0.1) == []
    assert pub.next_wake() == 0.1 + REJECT_RETRY_S[0]
    assert box.pump(0.1 + REJECT_RETRY_S[0]) == [2]  # a probe: one event, the oldest refused
    box.ack(2, 1.2, ok=False)
    assert box.pump(1.2 + REJECT_RETRY_S[1] - 0.01) == []  # the back-off grew
    now = 1.2 + REJECT_RETRY_S[1]
    assert box.pump(now) == [2]
    box.ack(2, now, ok=False)
    now += REJECT_RETRY_S[2]
    assert box.pump(now) == [2]
    box.ack(2, now)  # accepted again: the window opens and the order is kept
    after_probe = len(box.sent)
    assert box.pump(now) == [3, 4, 5, 6, 7]
    for q in range(3, 8):
        box.ack(q, now)
    assert box.pump(now) == [8, 9, 10]
    assert [q for _, q in box.sent[after_probe:]] == [3, 4, 5, 6, 7, 8, 9, 10]
    assert [q for _, q in box.sent[:after_probe]] == [1, 2, 3, 4, 5, 2, 2, 2]


def test_back_off_steps_cap_at_the_last_one() -> None:
    pub = Publisher(1)
    box = Outbox(pub, range(1, 2))
    now = 0.0
    waits = []
    for _ in range(len(REJECT_RETRY_S) + 2):
        assert box.pump(now) == [1]
        box.ack(1, now, ok=False)
        assert pub.retry_at is not None
        waits.append(pub.retry_at - now)
        now = pub.retry_at
    assert waits == [*REJECT_RETRY_S, REJECT_RETRY_S[-1], REJECT_RETRY_S[-1]]


def test_deletions_are_batched_by_count_or_age() -> None:
    pub = Publisher(1000)
    box = Outbox(pub, range(1, REMOVE_BATCH + 2))
    box.pump(0.0)
    box.ack(1, 0.0)
    assert pub.take_delivered(1.0) == []
    assert pub.next_wake() == REMOVE_DELAY_S
    assert pub.take_delivered(REMOVE_DELAY_S) == [1]
    for q in range(2, REMOVE_BATCH + 2):
        box.ack(q, 40.0)
    assert pub.take_delivered(40.0) == list(range(2, REMOVE_BATCH + 2))
    assert pub.take_delivered(40.0, force=True) == []


def test_collector_mode_waits_for_the_collector_and_is_bounded_by_max_unacked() -> None:
    pub = Publisher(20, collector_mode=True, max_unacked=8, resend_after_s=60.0)
    box = Outbox(pub, range(1, 31))
    assert box.pump(0.0) == []  # collector offline: keep buffering
    pub.on_collector_state(True, 0.0)
    assert box.pump(0.0) == list(range(1, 9))
    for q in range(1, 9):
        box.ack(q, 0.0)
    assert pub.delivered == []  # only the watermark removes events in this mode
    assert box.pump(0.0) == []  # 8 out beyond the watermark 0
    assert pub.on_watermark(5, 1.0) is True
    assert pub.on_watermark(3, 1.0) is False  # an older instance's word
    assert box.pump(1.0) == [9, 10, 11, 12, 13]


def test_collector_mode_resends_from_the_watermark_after_the_timeout() -> None:
    pub = Publisher(20, collector_mode=True, max_unacked=100, resend_after_s=60.0)
    box = Outbox(pub, range(1, 6))
    pub.on_collector_state(True, 0.0)
    assert box.pump(0.0) == [1, 2, 3, 4, 5]
    for q in range(1, 6):
        box.ack(q, 0.0)
    assert pub.on_watermark(2, 10.0)
    pub.check_resend(69.9)
    assert pub.resent == 0
    pub.check_resend(70.0)
    assert pub.resent == 3
    assert box.pump(70.0) == [3, 4, 5]  # the same events (event_ids) again
    pub.on_collector_state(False, 71.0)
    pub.check_resend(1000.0)
    assert pub.resent == 3  # nobody to resend to


def test_an_expired_back_off_ends_while_disconnected_so_the_loop_does_not_spin() -> None:
    pub = Publisher(5)
    box = Outbox(pub, range(1, 3))
    box.pump(0.0)
    box.ack(1, 0.0, ok=False)
    assert pub.next_wake() == REJECT_RETRY_S[0]
    pub.tick(REJECT_RETRY_S[0] + 0.5)  # the link is down: nobody asks wants()
    assert pub.next_wake() is None
