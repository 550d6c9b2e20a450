"""Power cuts of the whole Pi while presses flow (issue 16, "Power cuts of the
whole Pi").

The USB tier's rounds (test_power_cut.py) with the Pi as installed: a whole
Debian under systemd as PID 1, booted from this test's copy of the installed
Pi (one root disk across all rounds: the store, the journal, the file
systems).  Nothing starts the daemon but the boot: `feedback-edge.service`,
enabled by the first boot's install, with the config the card brought.
Each round boots the Pi, plugs in the console gadget (`--acked-log` on the
share) and starts the press loop while the service starts; once the daemon
has ACKed the console's HELLO, one guest command reads what must be read
before the cut (the unit's state and this boot's journal: a power cut may
take the journal's unflushed tail with it), then the loop presses; after a
seeded random number of presses, plus a seeded random part of one press
interval, QEMU is SIGKILLed.  After the last round the Pi boots once more,
without the console, until every ACKed press reached the host's broker and
the store is empty.

Checked, besides every check of test_power_cut.py over all rounds (every
ACKed press published as itself, nothing doubled, one seq one event_id, gaps
only where a `dropped` event announces them, the console's power-up logged
as a new session):
- the service came back by itself in every boot: active (READY=1) and
  running, started once by systemd (NRestarts 0, so no restart loop);
- the same in the last boot, after the store emptied.

Printed: the USB tier's per-round lines and table, with the time from QEMU's
start to the unit's activation (from the guest's own ActiveEnterTimestamp)
per round.  The seed is printed; FEEDBACK_POWER_CUT_SEED=N repeats the
inputs.  10 rounds in the default run, 100 under `-m soak`.
"""

from __future__ import annotations

import os
import shlex
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import Broker, Subscriber
from tests.vm.machine import GuestError
from tests.vm.pi import EDGE, SITE, PiGuest, PiMachines
from tests.vm.test_power_cut import (
    ACKED,
    BUTTONS,
    CONTROL,
    HOLD_MS,
    INTERVAL_MS,
    PRESS_LOOP,
    PRESSED,
    PRESSES,
    SERIAL,
    SIM,
    Round,
    _tail,
    _text,
    cut_after_presses,
    deliver,
    presses_made,
    run_power_cuts,
)

pytestmark = pytest.mark.vm

UNIT = "feedback-edge.service"
# In the share: the press loop's gate, made once the journal was read.  The
# read is slow under TCG; made between presses, it would move the cut past
# the seeded moment.
GO = "go"
# Round.timings: from just before QEMU starts; "active" from the guest's clock.
MILESTONES = (("boot", "agent"), ("active", "service active"), ("console", "console"),
              ("hello", "HELLO ACKed"), ("read", "journal read"), ("press", "first press"))
PROPS = ("ActiveState", "SubState", "NRestarts", "Result", "MainPID",
         "ActiveEnterTimestampMonotonic", "ExecMainStartTimestampMonotonic")
# Before the cut, in one guest command: the unit's state, then this boot's
# journal of it.  The daemon logs the power-up before it ACKs the HELLO, but
# journald reads its stderr on its own time, hence the bounded wait; a
# daemon that never logs it (the fault test_power_cut.py counts) costs ~10 s.
READ = f"""\
n=0
until journalctl -b -u {UNIT} -o cat --no-pager | grep -q 'powered up (HELLO)'; do
    n=$((n + 1)); [ "$n" -lt 50 ] || break
    sleep 0.2
done
systemctl show {UNIT} {' '.join(f'--property={p}' for p in PROPS)}
echo ---
journalctl -b -u {UNIT} -o cat --no-pager
"""


def _service(g: PiGuest) -> tuple[dict[str, str], str]:
    """The unit's PROPS and this boot's journal of it, in one guest command."""
    out = g.run(READ, timeout=120).stdout
    props, _, journal = out.partition("---\n")
    (g.rundir / "journal.txt").write_text(journal)
    return dict(line.split("=", 1) for line in props.splitlines() if "=" in line), journal


def _came_back(g: PiGuest, props: dict[str, str], journal: str, what: str) -> list[str]:
    """Faults of a service that should have come up by itself in this boot and
    stayed: not active, restarted, or no activation time."""
    faults = []
    if (props.get("ActiveState"), props.get("SubState")) != ("active", "running"):
        raise AssertionError(f"{what}: {UNIT} did not come back by itself: {props}\n"
                             f"journal:\n{journal[-4000:]}")
    if props.get("NRestarts") != "0":
        faults.append(f"{what}: {UNIT} restarted {props.get('NRestarts')} times in this boot "
                      f"(journal: {g.rundir / 'journal.txt'})")
    if int(props.get("ActiveEnterTimestampMonotonic") or 0) <= 0:
        faults.append(f"{what}: {UNIT} active without an activation time: {props}")
    return faults


def _active_s(g: PiGuest, props: dict[str, str]) -> float:
    """QEMU's start to the unit's activation: the agent's answer, less the
    guest's uptime then, plus the guest's clock when the unit became active."""
    at = int(props.get("ActiveEnterTimestampMonotonic") or 0) / 1e6
    return g.timings["boot_s"] - g.timings["guest_uptime_at_ready_s"] + at


def _pi_round(pi: PiMachines, r: Round) -> None:
    t = time.monotonic()
    # Not waited for active: the console's start is the longest, and it runs
    # while systemd starts the service.
    g = pi.boot(active=False)
    r.guest = g
    r.timings["boot"] = g.timings["boot_s"]
    console = [*SIM, "console", "--serial", SERIAL, "--buttons", str(BUTTONS), "--layout",
               "five-point", "--control", CONTROL, "--acked-log", f"/share/{ACKED}"]
    presses = ["python3", "-c", PRESS_LOOP, f"/share/{ACKED}", CONTROL, f"/share/{PRESSED}",
               str(r.press_seed), str(BUTTONS), str(PRESSES), str(INTERVAL_MS), str(HOLD_MS),
               f"/share/{GO}"]
    # One request to the guest instead of two: each is slow while the vCPU
    # boots the rest of the system.
    g.run(f"""set -e
(umask 0022; spawn console /share/console.log root {shlex.join(console)})
(umask 0022; spawn presses /share/presses.log root {shlex.join(presses)})
""")

    def evidence() -> str:
        if not g.running:
            return "(the guest is gone)"
        out = g.run(f"systemctl status --no-pager {UNIT}; journalctl -b -u {UNIT} -o cat "
                    "--no-pager | tail -n 60", check=False, timeout=120)
        return f"service:\n{out.stdout}{out.stderr}"

    enough = presses_made(g, r, evidence)
    milestones: dict[str, Callable[[], bool]] = {
        "console": lambda: "control" in _text(g.share / "console.log"),
        "hello": lambda: "HELLO" in _text(g.share / ACKED)}

    def hello() -> bool:
        for name, seen in milestones.items():
            if name not in r.timings and seen():
                r.timings[name] = time.monotonic() - t
        # The loop waits for the gate: it can only have ended in error.
        return "hello" in r.timings or enough()

    try:
        g.wait_for(hello, 300, f"round {r.n}: the daemon's ACK of the console's HELLO")
    except GuestError as e:
        raise GuestError(f"{e}\n{evidence()}\nconsole: {_tail(g.share / 'console.log')}") \
            from None
    props, journal = _service(g)
    r.timings["read"] = time.monotonic() - t
    r.timings["active"] = _active_s(g, props)
    r.new_session = "powered up (HELLO)" in journal
    r.errors += _came_back(g, props, journal, f"boot {len(pi.guests)}")
    (g.share / GO).touch()
    g.wait_for(lambda: (g.share / PRESSED).exists() or enough(), 60,
               f"round {r.n}: the first press")
    r.timings["press"] = time.monotonic() - t
    cut_after_presses(g, r, enough, t)


def _final_boot(pi: PiMachines, sub: Subscriber, expected: Callable[[list[dict[str, Any]]], bool],
                faults: list[str]) -> PiGuest:
    g = pi.boot()  # the service active by itself, or an AssertionError here
    deliver(g, sub, expected, faults)
    props, journal = _service(g)
    faults += _came_back(g, props, journal, "the last boot")
    print(f"  last boot: service active {_active_s(g, props):.1f} s after QEMU's start")
    g.poweroff()
    return g


def _summary(runs: list[Round]) -> str:
    active = [r.timings["active"] for r in runs if "active" in r.timings]
    if not active:
        return "  boot to active: none measured"
    return ("  QEMU start to service active, per round: "
            + " ".join(f"{s:.1f}" for s in active)
            + f" s (min {min(active):.1f}, median {statistics.median(active):.1f}, "
              f"max {max(active):.1f})")


@pytest.fixture
def site_events(site_broker: Broker) -> Iterator[Subscriber]:
    """The site broker's events of this edge, from before the first round."""
    sub = Subscriber(site_broker.port, f"feedback/v1/{SITE}/{EDGE}/event/#",
                     client_id=f"pi-power-cut-{os.getpid()}-{time.monotonic_ns()}")
    sub.start()
    yield sub
    sub.stop()


def _pi_power_cuts(pi: PiMachines, sub: Subscriber, validate: Callable[[str, Any], None],
                   rounds: int) -> None:
    run_power_cuts(sub, validate, rounds, lambda r: _pi_round(pi, r),
                   lambda expected, faults: _final_boot(pi, sub, expected, faults),
                   milestones=MILESTONES, summary=_summary)


def test_pi_power_cuts_while_presses_flow_lose_and_double_nothing(
        pi: PiMachines, site_events: Subscriber, validate: Callable[[str, Any], None]) -> None:
    _pi_power_cuts(pi, site_events, validate, 10)


@pytest.mark.soak
def test_pi_power_cuts_soak(
        pi: PiMachines, site_events: Subscriber, validate: Callable[[str, Any], None]) -> None:
    _pi_power_cuts(pi, site_events, validate, 100)
