"""The feedback console (ProLAN-202 class, USB HID): config, worker, events.

Protocol: ../shared/devices/console-hid.md, decoded by `drivers.console`.
The worker reads input reports and posts them; the main loop decides (new,
duplicate, device restarted) with `ConsoleHost`, stores, and only then ACKs
and lights the LED of each stored press.

The ACK is cumulative ("every event up to and including dev_seq"), so it is
exact: reports whose commit failed (disk full, read-only ...) are remembered
as unstored, and no ACK covers them, or anything after them, until they are
stored (the console keeps them and sends them again).  Where the sheet is
silent: the order of a session's events is their `event_uptime`; a power-up
(HELLO) while events are unstored means the console lost them with its RAM,
and they are counted under `device_power_loss`.

Device-side loss: the console's lost counter (info feature report, read at
connect and after a report flagged OVERFLOW) counts presses its 32-event ring
overwrote.  Each increase becomes a `device_lost` event (reason
ring_overflow, dedup key `lost:<total>` so a daemon restart does not record
it twice), a `device_overflow` drop count and a `device_lost` alarm.  A
counter above what the console can have lost (a press every 100 ms since its
power-up plus its ring of 32: faster than any hand, beyond a 30 ms debounce)
is a firmware fault, not a count: no `device_lost` is invented from it; it is
counted as `lost_implausible` and raises alarm `device_implausible`.  (After
its uptime wraps at 49.7 days a console's bound restarts low; a console that
has lost more than a press per 100 ms of that is still far from any clinic.)

Event time, by the device's clock (the sheet's "What the host must do"): a
press happened `age_ms` = now_uptime - event_uptime (mod 2^32, so at most
~49.7 days) before the report was sent, and a report that waited in the
console's endpoint (the daemon was stopped, or not yet reading) was sent
earlier than it was read: `drivers.console.DeviceClock` finds by how much,
from the offset between device uptime and the host clock seeded by the info
report at open.  Such an event is timed that much earlier, flagged
`replayed`, and counted under `late_delivery`.  The console lives on this
Pi's USB power and keeps its events in RAM, so a press from before this boot
is implausible (a console clock fault, or a Pi reboot that kept the hub
powered).  Such an age is clamped to the time since boot: the event is timed
at the boot (`mono_ns` 0, `wall` and `age_ms` to match), never before it, and
a warning is logged.

A console that powered up while nobody read it (the Pi's power cut, an
unplug while the daemon was stopped) may be seen first through a replayed
HELLO, whose key is the same in every session; the sheet's "uptime going
backwards" cannot tell it from the old session after a short one.  So the
power-up itself is tracked: at every open, the info report's `now_uptime`
gives the console's power-up in this boot's monotonic time, kept as a key
`up:<boot_id>:<power-up ms>:<when ms>`.  A power-up that moved (beyond 2 s
and 3000 ppm of drift since the key was written, modulo the 2^32 ms wrap), or,
after the Pi rebooted, one that came after this boot began (the console lives
on the Pi's USB power), starts a new session: the old session's keys and lost
counter go.  A console
older than the Pi's boot (a powered hub) keeps its session.

A console whose firmware cannot answer the info feature report (a stall, an
error, or zeros, as the kernel's own gadget HID function answers GET_REPORT)
is served anyway, once per open: as its config's labels say, or, when the
config names none, as 16 unlabelled buttons (`button-N`, no score; a guessed
layout would mislabel a yes/no or five-point console) with alarm
`device_unidentified` asking for labels.  The failure is counted
(`info_unreadable`) and shown in its status; without the report the
ring's lost counter is unknown (an OVERFLOW flag still marks the next event
`device_overflow`) and the device clock has no seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from drivers.console import (
    UPTIME_MOD,
    USB_MATCHER,
    ConsoleHost,
    ConsoleInfo,
    ConsoleReport,
    DeviceClock,
    Duplicate,
    NewSession,
    Record,
    ReportType,
    button_labels,
    encode_ack,
    encode_show,
)
from drivers.transport import HidTransport
from edge.events import DeviceLost, DeviceRef, Event, Press, new_event_id
from edge.kinds.base import (
    LOSS_ALARM_S,
    Context,
    Decision,
    Device,
    DeviceState,
    Env,
    Kind,
    Reading,
)
from edge.kinds.console_io import (
    ConsoleConfig,
    ConsoleInput,
    ConsoleLoss,
    ConsoleOpened,
    ConsoleWorker,
    fallback_info,
    open_console,
    parse,
)
from edge.store import Append

if TYPE_CHECKING:
    from drivers.usb_discovery import UsbDevice

__all__ = ["KIND", "Console", "ConsoleConfig", "ConsoleInput", "ConsoleLoss", "ConsoleOpened",
           "ConsoleWorker", "fallback_info", "open_console"]

log = logging.getLogger(__name__)


# -- decisions ----------------------------------------------------------------------


class Console(Device):
    cfg: ConsoleConfig
    worker: ConsoleWorker

    def __init__(self, cfg: ConsoleConfig, env: Env) -> None:
        opener: Callable[[ConsoleConfig], HidTransport] = env.opener or open_console
        super().__init__(cfg, ConsoleWorker(cfg, lambda: opener(cfg), env.post, env.clock))
        self._stored_keys = env.stored_keys
        # Dedup keys are scoped per console: (dev_seq, uptime, type, button).
        self.scope = f"console:{cfg.id}"
        keys = env.stored_keys(self.scope)
        self.host = ConsoleHost(_session_keys(keys))
        # The console's power-up as last seen: (boot_id, power-up ms, when ms).
        self._power_up = max((m for k in keys if (m := _power_up_key(k)) is not None),
                             key=lambda m: (m[0] == env.clock.boot_id, m[2]), default=None)
        self._fresh = False  # a new session begun at open, whose HELLO is still to come
        self.info: ConsoleInfo | None = None
        self.labels: tuple[tuple[str, int | None], ...] = ()
        # The lost counter already recorded in this device session.
        self.lost_seen = max((int(k[5:]) for k in keys if k.startswith("lost:")
                              and k[5:].isdigit()), default=0)
        # Reports decided since the last commit, and those whose commit failed
        # (key -> event_uptime): no ACK may cover an unstored one.
        self._batch: list[ConsoleReport] = []
        self.unstored: dict[str, int] = {}
        self._lost_committed = self.lost_seen
        # The newest durable report an ACK could not cover yet (an unstored one is older).
        self._held: ConsoleReport | None = None

    def on_state(self, msg: DeviceState, wall_ns: int) -> None:
        super().on_state(msg, wall_ns)
        if isinstance(msg.details, ConsoleInfo):
            self.info = msg.details
            self.labels = button_labels(msg.details.layout, msg.details.buttons,
                                        self.cfg.labels, self.cfg.scores)
            self.last_seen_ns = wall_ns

    def decide(self, r: Reading, ctx: Context) -> Decision:
        inp = r.data
        if isinstance(inp, ConsoleOpened):
            return self._opened(r, inp.uptime_ms, ctx)
        if isinstance(inp, ConsoleLoss):
            self._forget_overwritten(inp.unacked)
            if inp.uptime_ms is not None and inp.total > inp.uptime_ms // 100 + 32:
                self.count_decode_error("lost_implausible")
                ctx.alarm("device_implausible", f"console {self.cfg.id} at desk {self.cfg.desk}: "
                          f"lost counter {inp.total} after {inp.uptime_ms // 1000} s of power, "
                          "more than it can have lost: faulty firmware?", subject=self.cfg.id,
                          for_s=LOSS_ALARM_S)
                return Decision()
            return self._loss(r, inp.total, ctx)
        assert isinstance(inp, ConsoleInput)  # noqa: S101 - posted by ConsoleWorker only
        # When the report was sent, not read: reports that waited in the endpoint
        # come in a burst, their uptimes seconds apart, and judged by when they
        # were read the device's uptime would seem to jump: a restart, and the
        # same press stored again.
        action = self.host.on_report(inp.report, r.host_mono_ns - inp.waited_ms * 1_000_000)
        if isinstance(action, Duplicate):
            return Decision(duplicate=True, token=inp.report)
        self._batch.append(inp.report)
        if isinstance(action, NewSession):
            log.info("device %s powered up (HELLO)", self.cfg.id)
            return Decision([*self._new_session(r, ctx), Append(None, (self.scope, action.key)),
                             self._up_key(r, inp.report.now_uptime + inp.waited_ms, ctx)],
                            (self.scope,), token=inp.report)
        assert isinstance(action, Record)  # noqa: S101 - the three host actions
        if not action.new_session:
            self._fresh = False  # the new session's HELLO was not read: no second start
        forget: tuple[str, ...] = ()
        gone: list[Append] = []
        if action.new_session:
            gone = [*self._new_session(r, ctx),
                    self._up_key(r, inp.report.now_uptime + inp.waited_ms, ctx)]
            forget = (self.scope,)
        # A dropped press still records its key, so its replays are
        # recognised instead of being judged (and counted) again.
        return Decision([*gone, Append(self._event(r, inp, ctx),
                                       (self.scope, action.key))], forget, token=inp.report)

    def _event(self, r: Reading, inp: ConsoleInput, ctx: Context) -> Event | None:
        rep = inp.report
        age_ms = rep.age_ms + inp.waited_ms
        if inp.waited_ms:
            ctx.count("late_delivery")
        if age_ms * 1_000_000 > r.host_mono_ns:
            # Not before this boot (module docstring): timed at the boot.
            log.warning("device %s: a press %d ms old, from before this boot %d ms ago: "
                        "timed at the boot", self.cfg.id, age_ms, r.host_mono_ns // 1_000_000)
            age_ms = max(0, r.host_mono_ns // 1_000_000)
        age_ns = age_ms * 1_000_000
        mono, wall = r.host_mono_ns - age_ns, r.host_wall_ns - age_ns
        label, score = self.labels[rep.button] if rep.button < len(self.labels) else \
            (f"button-{rep.button}", None)
        hold = rep.type is ReportType.HOLD
        flags = ctx.guard(self.cfg.desk, mono, wall, hold)
        if flags is None:
            return None
        if rep.replay or inp.waited_ms:
            flags += ("replayed",)
        if rep.overflow:
            flags += ("device_overflow",)
        return Event(event_id=new_event_id(), desk=self.cfg.desk,
                     device=DeviceRef(self.cfg.id, "console", self.cfg.serial),
                     body=Press(button=rep.button, label=label, score=score, hold=hold),
                     operator=ctx.operator(self.cfg.desk, wall),
                     time=ctx.event_time(mono, wall, age_ms), flags=flags)

    def _opened(self, r: Reading, uptime_ms: int, ctx: Context) -> Decision:
        """The console was (re)opened: a new session if it powered up since (module
        docstring); the power-up is kept as a key either way."""
        boot, now_ms = ctx.clock.boot_id, r.host_mono_ns // 1_000_000
        up_ms = now_ms - uptime_ms  # negative: before this boot of the Pi
        new = False
        if self._power_up is not None:
            m_boot, m_up, m_at = self._power_up
            moved = (up_ms - m_up + UPTIME_MOD // 2) % UPTIME_MOD - UPTIME_MOD // 2
            allowed = 2000 + (now_ms - m_at) * DeviceClock.DRIFT_PPM // 1_000_000
            new = abs(moved) > allowed if m_boot == boot else up_ms >= 0
        key = self._up_key(r, uptime_ms, ctx)
        if not new:
            return Decision([key])
        log.info("device %s powered up since it was last read: a new session", self.cfg.id)
        self.host = ConsoleHost([])
        gone = self._new_session(r, ctx)
        self._fresh = True
        return Decision([*gone, key], (self.scope,))

    def _up_key(self, r: Reading, uptime_ms: int, ctx: Context) -> Append:
        """The console's power-up as a key of its scope (kept across a new session's
        forgetting of the old keys, which runs before the appends)."""
        now_ms = r.host_mono_ns // 1_000_000
        self._power_up = (ctx.clock.boot_id, now_ms - uptime_ms, now_ms)
        return Append(None, (self.scope, f"up:{ctx.clock.boot_id}:{now_ms - uptime_ms}:{now_ms}"))

    def _new_session(self, r: Reading, ctx: Context) -> list[Append]:
        """The console powered up: its ring, and what we had not stored of it, is
        gone: a device_lost record (power_loss) for those."""
        if self._fresh:  # begun at open already; this is its HELLO
            self._fresh = False
            return []
        self.resets += 1
        self.lost_seen = self._lost_committed = 0
        if not self.unstored:
            return []
        n = len(self.unstored)
        self.unstored.clear()
        log.warning("device %s: powered up with %d presses not yet stored: lost", self.cfg.id, n)
        return [self._lost_record(r, ctx, (n, n), reason="power_loss",
                                  key=f"power:{r.host_mono_ns}")]

    def _forget_overwritten(self, unacked: int | None) -> None:
        """The ring holds the newest `unacked` events after the last ACK: unstored
        ones older than those were overwritten, and must not hold the ACK back."""
        if unacked is None or len(self.unstored) <= unacked:
            return
        keep = sorted(self.unstored.items(), key=lambda kv: kv[1])[-unacked:] if unacked else []
        log.warning("device %s: %d unstored presses were overwritten in its ring", self.cfg.id,
                    len(self.unstored) - len(keep))
        self.unstored = dict(keep)

    def _loss(self, r: Reading, total: int, ctx: Context) -> Decision:
        """A lost counter read from the console: record what is new in it."""
        if total <= self.lost_seen:
            return Decision()
        n = total - self.lost_seen
        self.lost_seen = total  # provisional: commit_failed() goes back
        return Decision([self._lost_record(r, ctx, (n, total), reason="ring_overflow",
                                           key=f"lost:{total}")])

    def _lost_record(self, r: Reading, ctx: Context, counts: tuple[int, int], *, reason: str,
                     key: str) -> Append:
        """A device_lost record of (newly lost, total) events, deduplicated by `key`."""
        n, total = counts
        event = Event(event_id=new_event_id(), desk=self.cfg.desk,
                      device=DeviceRef(self.cfg.id, "console", self.cfg.serial),
                      body=DeviceLost(lost=n, total=total, reason=reason),
                      operator=ctx.operator(self.cfg.desk, r.host_wall_ns),
                      time=ctx.event_time(r.host_mono_ns, r.host_wall_ns))
        return Append(event, (self.scope, key))

    def committed(self, outcomes: Sequence[tuple[Decision, Sequence[bool]]],
                  ctx: Context) -> None:
        self._batch.clear()
        handled: list[ConsoleReport] = []
        self._lost_committed = self.lost_seen
        ctx.lost_on_device(self.cfg, outcomes)
        for decision, stored in outcomes:
            rep = decision.token
            if not isinstance(rep, ConsoleReport):
                continue  # a lost-counter record: nothing to acknowledge
            if decision.forget:
                handled.clear()  # a new device session: earlier dev_seqs mean nothing now
                self._held = None
            handled.append(rep)
            self.unstored.pop(rep.key, None)  # durable now (stored, or known as stored)
            if any(stored) and rep.type is ReportType.PRESS and ctx.led_ms > 0:
                self.worker.send(encode_show(rep.button, ms=ctx.led_ms))
        # Cumulative: the newest report handled (now or held back before) that is
        # older than the oldest unstored one; what is newer waits for it.
        candidates = [*handled, *([self._held] if self._held is not None else [])]
        oldest = min(self.unstored.values(), default=None)
        ack = [r for r in candidates if oldest is None or r.event_uptime < oldest]
        held = [r for r in candidates if oldest is not None and r.event_uptime >= oldest]
        self._held = max(held, key=lambda r: r.event_uptime) if held else None
        if ack:
            self.worker.send(encode_ack(max(ack, key=lambda r: r.event_uptime).dev_seq))

    def commit_failed(self) -> None:
        self.lost_seen = self._lost_committed
        for rep in self._batch:
            self.unstored[rep.key] = rep.event_uptime
        self._batch.clear()
        # The host remembered keys that never reached the disk.
        self.host = ConsoleHost(_session_keys(self._stored_keys(self.scope)))

    def details(self) -> dict[str, Any]:
        return {"buttons": self.info.buttons if self.info else None}


def _session_keys(keys: list[str]) -> list[str]:
    """The dedup keys of presses and HELLOs, without lost counters and power-ups."""
    return [k for k in keys if not k.startswith(("lost:", "up:"))]


def _power_up_key(key: str) -> tuple[str, int, int] | None:
    """(boot_id, power-up ms, when ms) of an `up:` key, or None."""
    parts = key[3:].rsplit(":", 2) if key.startswith("up:") else []
    if len(parts) != 3:
        return None
    try:
        return parts[0], int(parts[1]), int(parts[2])
    except ValueError:
        return None


def _snippet(usb: UsbDevice) -> list[str]:
    return ['kind = "console"', f'serial = "{usb.serial}"' if usb.serial else
            "serial = \"CHANGE-ME\"   # from the console's label"]


KIND: Final = Kind("console", parse, Console, _snippet, USB_MATCHER, rank=0)
