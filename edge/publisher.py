"""Which stored events go to the broker next, and what PUBACKs and the
collector's watermark mean for them: the publishing state machine, sans I/O.

The daemon owns the store and the MQTT link; this class owns only decisions,
with the time passed in (seconds of the daemon's injected monotonic clock),
so every rule here is tested with a fake clock and no broker:

- **Order and window.**  Events go out in seq order, at most `window` in
  flight, where window = min(`broker.window`, the broker's Receive Maximum
  from CONNACK): paho does not enforce Receive Maximum itself
  (shared/measured.md), and a small window keeps press-to-PUBACK latency low.
- **PUBACK reason codes** (MQTT v5, section 3.4.2.1): below 0x80 the broker
  has the message, so (in `broker` delivery) it may leave the store; deletions
  are batched (`REMOVE_BATCH`, `REMOVE_DELAY_S`) because they ride along the
  next insert's transaction, which rewrites the same page anyway.
- **Refusals** (0x80 and above: quota, not authorised ...): the event stays;
  publishing restarts from it after 1, 5, 30, 60 s (the back-off grows once
  per probe), one event at a time until the broker takes one, so a later seq
  never gets in ahead of a refused one.
- **`collector` delivery** (mqtt-contract.md, "Delivery to the collector"):
  events leave the store only when the collector's retained ack watermark
  covers them; nothing goes out while the collector is offline; at most
  `max_unacked` are out beyond the watermark; what is not covered within
  `resend_after_s` goes out again from the watermark (same event_id).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["REJECT_RETRY_S", "REMOVE_BATCH", "REMOVE_DELAY_S", "Publisher", "Want"]

log = logging.getLogger(__name__)

REJECT_RETRY_S: Final = (1.0, 5.0, 30.0, 60.0)
# A deletion lost to a crash only means publishing that event again, which
# the collector drops by event_id; batching halves the bytes written per event.
REMOVE_BATCH: Final = 256
REMOVE_DELAY_S: Final = 30.0


@dataclass(frozen=True, slots=True)
class Want:
    """Room for `room` more events with seq > `after`, leaving out `skip`."""

    after: int
    room: int
    skip: frozenset[int] = field(default_factory=frozenset)


class Publisher:
    """The publishing state of one edge's outbox (one instance per daemon).

    Args:
        window: `broker.window` from the config (events in flight, 1..1000).
        collector_mode: True for `[delivery] mode = "collector"`.
        max_unacked: `[delivery] max_unacked` (events out beyond the watermark).
        resend_after_s: `[delivery] resend_after_s` (seconds).
        now: the current monotonic time in seconds.
    """

    def __init__(self, window: int, *, collector_mode: bool = False, max_unacked: int = 500,
                 resend_after_s: float = 60.0, now: float = 0.0) -> None:
        self.configured_window = window
        self.window = window
        self.collector_mode = collector_mode
        self.max_unacked = max_unacked
        self.resend_after_s = resend_after_s
        self.inflight: dict[int, int] = {}  # mid -> seq
        self.inflight_seqs: set[int] = set()
        self.cursor = 0  # highest seq handed to the link since the last rewind
        self.published_high = 0  # highest seq ever handed to the link
        self.retry_at: float | None = None
        self._reject_streak = 0
        self.probing = False
        self.delivered: list[int] = []  # PUBACKed, not yet deleted from the store
        self._delivered_since = 0.0
        self.collector_online = False
        self.watermark = 0  # every seq <= this is committed at the collector
        self._progress_at = now  # the watermark last moved (or nothing was owed)
        self.resent = 0
        self.published = 0
        self.acked = 0
        self.rejected: dict[str, int] = {}

    # -- the link ---------------------------------------------------------------

    def connected(self, receive_maximum: int) -> None:
        """CONNACK: the window is min(config, the broker's Receive Maximum), at least 1."""
        self.window = max(1, min(self.configured_window, receive_maximum))

    def wants(self, now: float) -> Want | None:
        """What may be published now (the caller is connected), or None."""
        if self.retry_at is not None:
            if now < self.retry_at:
                return None
            self.retry_at = None
        room = (1 if self.probing else self.window) - len(self.inflight)
        if self.collector_mode:
            if not self.collector_online:
                return None  # nobody would commit them: keep buffering
            if self.cursor <= self.watermark:
                self._progress_at = now  # nothing owed until now
            # Bounded, so a slow collector's queue on the broker cannot overflow.
            room = min(room, self.max_unacked - (self.cursor - self.watermark))
        if room <= 0:
            return None
        skip: frozenset[int] = frozenset()
        # Only after a rewind (a refusal, a resend) can seqs above the cursor
        # be in flight or delivered already; normally nothing is skipped.
        if self.cursor < self.published_high:
            skip = frozenset(q for q in (*self.inflight_seqs, *self.delivered) if q > self.cursor)
        return Want(self.cursor, room, skip)

    def sent(self, mid: int, seq: int) -> None:
        """The link took event `seq` as message `mid`."""
        self.inflight[mid] = seq
        self.inflight_seqs.add(seq)
        self.cursor = max(self.cursor, seq)
        self.published_high = max(self.published_high, seq)
        self.published += 1

    def on_puback(self, mid: int, ok: bool, reason: str, now: float) -> bool:
        """A PUBACK; False if `mid` was not an event (status, health ...)."""
        seq = self.inflight.pop(mid, None)
        if seq is None:
            return False
        self.inflight_seqs.discard(seq)
        if ok:
            self.acked += 1
            self._reject_streak = 0
            self.probing = False
            if not self.collector_mode:  # there only the watermark removes events
                if not self.delivered:
                    self._delivered_since = now
                self.delivered.append(seq)
            return True
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.cursor = min(self.cursor, seq - 1)
        if self.retry_at is None:
            delay = REJECT_RETRY_S[min(self._reject_streak, len(REJECT_RETRY_S) - 1)]
            self._reject_streak += 1
            self.retry_at = now + delay
            log.warning("broker refused event seq %d: %s; retrying in %.0f s", seq, reason,
                        delay)
        self.probing = True
        return True

    # -- deletions ----------------------------------------------------------------

    def take_delivered(self, now: float, *, force: bool = False) -> list[int]:
        """The delivered seqs that are due for deletion now (and forgets them)."""
        if not self.delivered or not (force or len(self.delivered) >= REMOVE_BATCH
                                      or now - self._delivered_since >= REMOVE_DELAY_S):
            return []
        out, self.delivered = self.delivered, []
        return out

    def next_wake(self) -> float | None:
        """The next time a timer of this class is due (monotonic seconds), or None."""
        wakes = [t for t in (self.retry_at,
                             self._delivered_since + REMOVE_DELAY_S if self.delivered else None)
                 if t is not None]
        return min(wakes) if wakes else None

    # -- the collector --------------------------------------------------------------

    def on_collector_state(self, online: bool, now: float) -> None:
        if online != self.collector_online:
            log.info("collector %s: %s", "online" if online else "offline",
                     "publishing" if online else "buffering until it is back")
        self.collector_online = online
        self._progress_at = now

    def on_watermark(self, seq: int, now: float) -> bool:
        """The collector's ack watermark; True if it moved (delete through `seq`)."""
        if seq <= self.watermark:
            return False  # an older collector instance's word, or a repeat
        self.watermark = seq
        self._progress_at = now
        self.cursor = max(self.cursor, seq)
        return True

    def tick(self, now: float) -> None:
        """Every main-loop turn: an expired refusal back-off ends (connected or not,
        so `next_wake` never names a past time), and the resend check runs."""
        if self.retry_at is not None and now >= self.retry_at:
            self.retry_at = None
        self.check_resend(now)

    def check_resend(self, now: float) -> None:
        """Sent events the collector has not acknowledged in time go out again."""
        owed = self.cursor > self.watermark  # the cursor never passes published_high
        if not (self.collector_mode and self.collector_online and owed):
            return
        if now - self._progress_at < self.resend_after_s:
            return
        log.warning("collector acknowledged nothing above seq %d for %.0f s: sending again",
                    self.watermark, now - self._progress_at)
        self.resent += self.cursor - self.watermark
        self.cursor = self.watermark
        self._progress_at = now

    def delivery_status(self) -> dict[str, Any]:
        """The `delivery` object of health and status (schemas/health.schema.json)."""
        return {"mode": "collector" if self.collector_mode else "broker",
                "collector_online": self.collector_online if self.collector_mode else None,
                "watermark": self.watermark if self.collector_mode else None,
                "resent": self.resent}
