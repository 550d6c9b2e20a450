"""Power cuts of the whole Pi while presses flow (issue 15, "Power cuts").

Each round boots the guest on the same ext4 disk (the store), plugs in the
console (firmware_sim's FunctionFS console, five buttons), starts the installed
daemon as the service user and presses seeded random buttons every
INTERVAL_MS from a loop in the guest, once the daemon serves the console; when the
loop has made a seeded random number of presses, plus a seeded random part of
one press interval, QEMU is SIGKILLed: the Pi, the console and its RAM ring
lose power at once.  The console records every event it was ACKed for in the
host's file system as the ACK arrives (`--acked-log` on the 9p share), and the
press loop records every press before it makes it, so both survive the cut.
After the last round a last boot lets the daemon deliver what is left.

Checked over all rounds, against what the host's broker received:
- every press the console was ACKed for is published, as itself: the presses
  of one power-up session (one guest boot: the event's `time.boot_id`), in
  seq order, are the loop's presses in the order they were made, with their
  buttons, and timed by the device's clock within `TOLERANCE_MS` of the
  console's own record of the press;
- nothing is published that was not pressed, and no press twice (one press
  is one event_id; two events for one press show as a shift in the order, or
  as the same button twice within the debounce);
- one seq is one event_id and one event_id one seq, across all rounds;
- presses lost with the console's RAM are only unacknowledged ones: counted,
  with any `device_lost` events and `dropped` announcements, per round.

Also printed, not asserted: the rounds where the daemon did not log the
console's power-up (it took the new power-up's replayed HELLO for the previous
session's, whose dedup keys and lost counter it then keeps).

The seed is printed; FEEDBACK_POWER_CUT_SEED=N runs the same inputs again
(the timing under TCG is not the same, so a fault may need a few runs).
`-m soak` runs 200 rounds instead of 20 (about an hour here).

The rounds' bookkeeping and the checks above (`run_power_cuts`) take how a
round is booted and cut, and how the last boot is made, as arguments: the Pi
tier (test_pi_power_cut.py) cuts a whole Debian under systemd with them.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Broker, Subscriber
from tests.vm.machine import CONFIG, DAEMON, HOST, SERVICE_USER, Guest, GuestError, Machines

pytestmark = pytest.mark.vm

SITE, EDGE = "vm-site", "vm-edge"
SERIAL = "00A1B2C3D4E5"
BUTTONS = 5  # five-point layout: a missing or doubled press shifts a 1-in-5 sequence
DEVICE = f"fc3-{SERIAL.lower()}"
CONTROL = "/run/console.ctl"
ACKED = "acked.jsonl"  # in each boot's /share
PRESSED = "presses.jsonl"
PRESSES = 25  # at most per round; the cut comes after 1..PRESSES of them
INTERVAL_MS = 150  # between presses: 5 times the console's 30 ms debounce
HOLD_MS = 40
# How far the daemon's time for a press (mono_ns, by the device's clock) may be
# from the console's own (its power-up plus event_uptime).  The daemon times a
# report by its now_uptime and the offset to the host clock it estimates from
# its lowest-delay sample, and takes a report read more than 100 ms above that
# as one that waited (drivers.console.DeviceClock): its error stays below that.
# The next press made is INTERVAL_MS away, so a press published in another's
# place is off by more.
TOLERANCE_MS = 100
STRAY = "press from no round's boot"
# A round's times (Round.timings keys) and how the round's line names them.
MILESTONES = (("boot", "ready"), ("spawned", "spawned"), ("console", "console"),
              ("daemon", "daemon HELLO"), ("hello", "HELLO ACKed"), ("press", "first press"))
SIM = ["checkout-python", "-m", "firmware_sim.usb"]

# The guest's press loop: waits (with a deadline) until the daemon has ACKed
# the console's HELLO, and the optional gate file exists (the test's go), then
# presses seeded random buttons every INTERVAL_MS, recording each press on the
# share *before* making it.
PRESS_LOOP = r"""
import json, os, random, socket, struct, sys, time
acked, ctl, out, seed, buttons, count, interval_ms, hold_ms = sys.argv[1:9]
gate = sys.argv[9] if len(sys.argv) > 9 else None
def hello_acked():
    try:
        with open(acked) as f:
            return '"HELLO"' in f.read()
    except FileNotFoundError:
        return False
deadline = time.monotonic() + 180
while not (hello_acked() and (gate is None or os.path.exists(gate))):
    if time.monotonic() > deadline:
        sys.exit("the daemon did not ACK the console's HELLO within 180 s"
                 if not hello_acked() else f"no {gate} within 180 s")
    time.sleep(0.05)
# The control socket's framing (firmware_sim.link): kind, u16le length, payload.
hdr = struct.Struct("<cH")
def recv(n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            sys.exit("the console closed its control socket")
        buf += chunk
    return buf
sock = socket.socket(socket.AF_UNIX)
sock.connect(ctl)
rng = random.Random(int(seed))
fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
slot = time.monotonic()
for i in range(int(count)):
    button = rng.randrange(int(buttons))
    os.write(fd, (json.dumps({"i": i, "button": button,
                              "mono_ms": time.monotonic_ns() // 1_000_000}) + "\n").encode())
    press = json.dumps({"button": button, "hold_ms": int(hold_ms)}).encode()
    sock.sendall(hdr.pack(b"P", len(press)) + press)
    kind, n = hdr.unpack(recv(hdr.size))
    reply = json.loads(recv(n))
    if kind != b"x" or not reply.get("ok"):
        sys.exit(f"press refused: {kind} {reply}")
    slot += int(interval_ms) / 1000
    time.sleep(max(0.0, slot - time.monotonic()))
"""


def _config(broker: Broker) -> str:
    return f"""\
site = "{SITE}"
edge = "{EDGE}"

[broker]
host = "{HOST}"
port = {broker.port}
allow_plaintext = true

[[devices]]
kind = "console"
serial = "{SERIAL}"
desk = "desk-1"
"""


def _lines(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a file that may end in a torn one."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            out.append(json.loads(line))
    return out


@dataclass
class Round:
    n: int
    trigger: int  # presses made when the cut came (plus `delay_s`)
    delay_s: float
    press_seed: int  # the press loop's buttons
    guest: Guest | None = None
    boot_id: str = ""
    pressed: list[dict[str, Any]] = field(default_factory=list)  # the loop's record
    acked: list[dict[str, Any]] = field(default_factory=list)  # the console's PRESSes ACKed
    published: list[dict[str, Any]] = field(default_factory=list)  # press events, seq order
    device_lost: int = 0
    doubled: int = 0
    new_session: bool = False  # the daemon logged the console's power-up as one
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def _power_cut_round(vm: Machines, disk: Path, config: str, r: Round) -> None:
    t = time.monotonic()
    g = vm.boot(disk=disk, udcs=1)
    r.guest = g
    try:
        _usb_round(g, config, r, t)
    finally:
        r.new_session = "powered up (HELLO)" in _text(g.share / "daemon.log")


def _usb_round(g: Guest, config: str, r: Round, t: float) -> None:
    # The console first (its start is the longest), then the daemon as
    # Guest.start_daemon starts it (0640 config, umask 0077, the service user),
    # then the press loop: in one request to the guest instead of four, each
    # slow while the vCPU is busy starting the others.
    (g.share / "edge.toml").write_text(config)
    console = [*SIM, "console", "--serial", SERIAL, "--buttons", str(BUTTONS), "--layout",
               "five-point", "--control", CONTROL, "--acked-log", f"/share/{ACKED}"]
    daemon = [DAEMON, "run", "--config", CONFIG]
    presses = ["python3", "-c", PRESS_LOOP, f"/share/{ACKED}", CONTROL, f"/share/{PRESSED}",
               str(r.press_seed), str(BUTTONS), str(PRESSES), str(INTERVAL_MS), str(HOLD_MS)]
    g.run(f"""set -e
(umask 0022; spawn console /share/console.log root {shlex.join(console)})
install -D -m 0640 -o root -g {SERVICE_USER} /share/edge.toml {CONFIG}
(umask 0077; spawn daemon /share/daemon.log {SERVICE_USER} {shlex.join(daemon)})
(umask 0022; spawn presses /share/presses.log root {shlex.join(presses)})
""")
    r.timings["spawned"] = time.monotonic() - t
    pressed = g.share / PRESSED
    enough = presses_made(g, r, lambda: f"daemon: {_tail(g.share / 'daemon.log')}")
    r.timings["boot"] = g.timings["boot_s"]
    milestones = {"console": lambda: "control" in _text(g.share / "console.log"),
                  "daemon": lambda: "powered up (HELLO)" in _text(g.share / "daemon.log"),
                  "hello": lambda: "HELLO" in _text(g.share / ACKED), "press": pressed.exists}

    def started() -> bool:
        for name, seen in milestones.items():
            if name not in r.timings and seen():
                r.timings[name] = time.monotonic() - t
        return "press" in r.timings or enough()

    g.wait_for(started, 240, f"round {r.n}: the first press")
    cut_after_presses(g, r, enough, t)


def presses_made(g: Guest, r: Round, daemon_log: Callable[[], str]) -> Callable[[], bool]:
    """Whether the press loop has made the round's `trigger` presses; raises
    when it ended before that (with its log, the daemon's and the console's)."""
    pressed = g.share / PRESSED
    rc = g.share / ".vm" / "proc" / "presses.rc"

    def enough() -> bool:
        if rc.exists() and len(_lines(pressed)) < r.trigger:
            raise GuestError(f"round {r.n}: the press loop ended early: "
                             f"{_text(g.share / 'presses.log')[-2000:]}\n"
                             f"{daemon_log()}\n"
                             f"console: {_tail(g.share / 'console.log')}")
        return len(_lines(pressed)) >= r.trigger

    return enough


def cut_after_presses(g: Guest, r: Round, enough: Callable[[], bool], t: float) -> None:
    """Once the press loop has made the round's presses, the rest of the cut's
    moment, then the cut; the round's time from `t`."""
    g.wait_for(enough, 240, f"round {r.n}: {r.trigger} presses")
    # The rest of the cut's moment, within a press interval: the test's input.
    threading.Event().wait(r.delay_s)
    g.power_cut()
    r.seconds = time.monotonic() - t


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(none)"


def _final_boot(vm: Machines, disk: Path, config: str, sub: Subscriber,
                expected: Callable[[list[dict[str, Any]]], bool], faults: list[str]) -> Guest:
    """Boot once more, without the console, until the store is empty."""
    g = vm.boot(disk=disk, udcs=1)
    g.start_daemon(config)
    deliver(g, sub, expected, faults)
    g.poweroff()
    return g


def deliver(g: Guest, sub: Subscriber, expected: Callable[[list[dict[str, Any]]], bool],
            faults: list[str]) -> None:
    """Until what `expected` wants reached the host's broker and the daemon's
    store is empty.  What does not arrive is a fault for the report, not an
    exception here."""
    try:
        g.wait_for(lambda: expected(_events(sub)), 120, "every ACKed press at the host's broker")
    except GuestError:
        faults.append("not every ACKed press reached the host's broker within 120 s of the "
                      "last boot")

    def drained() -> bool:
        r = g.run(f"{DAEMON} status --config {CONFIG} --json", user=SERVICE_USER, check=False)
        try:
            return json.loads(r.stdout)["queue"]["depth"] == 0
        except (ValueError, KeyError, TypeError):
            return False

    try:
        g.wait_for(drained, 120, "the daemon's store to be empty", interval=0.5)
    except GuestError as e:
        faults.append(f"the daemon's store did not empty in the last boot: {e}")


def _events(sub: Subscriber) -> list[dict[str, Any]]:
    return [m.json() for m in sub.snapshot() if "/event/" in m.topic]


def _mono_ms(e: dict[str, Any]) -> float:
    return float(e["time"]["mono_ns"]) / 1e6


def _check_round(r: Round) -> None:
    """The round's published presses, in seq order, against the loop's presses
    and the console's ACKs (module docstring)."""
    pressed, acked, pub = r.pressed, r.acked, r.published
    if [a["button"] for a in acked] != [p["button"] for p in pressed[:len(acked)]]:
        r.errors.append("the console's ACKed presses are not the loop's first presses "
                        "(the simulator lost one: ring overflow?)")
    if len(pub) < len(acked):
        tail = ", ".join(f"dev_seq {a['dev_seq']} button {a['button']} at uptime "
                         f"{a['event_uptime']} ms" for a in acked[len(pub):])
        r.errors.append(f"{len(acked) - len(pub)} ACKed presses were not published (the "
                        f"last ACKed, unless one before them is missing: {tail})")
    if len(pub) > len(pressed):
        r.errors.append(f"{len(pub)} presses published, {len(pressed)} made")
    # Two events for one press: the same button within half a press interval.
    pairs = 0
    for i, e in enumerate(pub):
        for f in pub[:i]:
            gap = _mono_ms(e) - _mono_ms(f)
            if e["press"]["button"] == f["press"]["button"] and abs(gap) < INTERVAL_MS / 2:
                pairs += 1
                r.errors.append(f"seq {f['seq']} and {e['seq']} (event_ids {f['event_id']}, "
                                f"{e['event_id']}): button {e['press']['button']} {gap:+.0f} ms "
                                "apart: one press stored twice")
    r.doubled = max(pairs, len(pub) - len(pressed))
    for i, e in enumerate(pub[:len(pressed)]):
        what = f"published press {i + 1} (seq {e['seq']}, event_id {e['event_id']})"
        if e["press"]["button"] != pressed[i]["button"]:
            r.errors.append(f"{what}: button {e['press']['button']}, but press {i + 1} made "
                            f"was button {pressed[i]['button']}: a press missing or doubled")
            break
        if i < len(acked):
            a = acked[i]
            off = _mono_ms(e) - (a["power_up_ms"] + a["event_uptime"])
            if abs(off) > TOLERANCE_MS:
                r.errors.append(f"{what}: timed {off:+.0f} ms from the console's press "
                                f"{i + 1} (dev_seq {a['dev_seq']}): another press in its place")
                break


# A round: boots (setting Round.guest as soon as QEMU runs), plugs in the
# console with `--acked-log /share/ACKED`, runs PRESS_LOOP recording to
# /share/PRESSED, cuts power (`cut_after_presses`), and sets Round.new_session
# from the daemon's log, Round.timings and Round.seconds.
BootRound = Callable[[Round], None]
# The last boot: given whether the broker has everything ACKed, and the faults
# list, boots without the console, lets the daemon deliver (`deliver`) and
# stops the guest; the guest.
FinalBoot = Callable[[Callable[[list[dict[str, Any]]], bool], list[str]], Guest]


def run_power_cuts(sub: Subscriber, validate: Callable[[str, Any], None], rounds: int,
                   boot_round: BootRound, final_boot: FinalBoot, *,
                   milestones: Sequence[tuple[str, str]] = MILESTONES,
                   summary: Callable[[list[Round]], str] | None = None) -> None:
    """`rounds` power cuts and the last boot, then every check of the module's
    docstring over what `sub` received; `summary` adds lines to the report."""
    seed = int(os.environ.get("FEEDBACK_POWER_CUT_SEED") or random.SystemRandom().getrandbits(32))
    print(f"\npower cuts: {rounds} rounds, seed {seed} (FEEDBACK_POWER_CUT_SEED={seed} "
          "repeats the inputs)")
    rng = random.Random(seed)
    t0 = time.monotonic()
    runs = [Round(n + 1, rng.randint(1, PRESSES), rng.uniform(0, INTERVAL_MS / 1000),
                  rng.getrandbits(32)) for n in range(rounds)]
    for r in runs:
        try:
            boot_round(r)
        finally:
            if r.guest is not None:
                r.acked = _lines(r.guest.share / ACKED)
                r.pressed = _lines(r.guest.share / PRESSED)
        boot_ids = {a["boot_id"] for a in r.acked}
        sessions = {a["power_up_ms"] for a in r.acked}
        assert len(boot_ids) == 1, f"round {r.n}: {boot_ids}"
        assert len(sessions) == 1, f"round {r.n}: the console powered up {len(sessions)} times"
        r.boot_id = boot_ids.pop()
        r.acked = [a for a in r.acked if a["type"] == "PRESS"]
        print(f"  round {r.n:3}: cut after {r.trigger:2} presses + {r.delay_s * 1000:3.0f} ms "
              f"-> made {len(r.pressed):2}, ACKed {len(r.acked):2}; {r.seconds:.1f} s "
              f"({', '.join(name for _, name in milestones)} at "
              + ", ".join(f"{r.timings.get(k, 0):.1f}" for k, _ in milestones) + " s)"
              + ("" if r.new_session else " [the daemon logged no new console session]"),
              flush=True)

    def every_acked_press_published(events: list[dict[str, Any]]) -> bool:
        ids = Counter(e["time"]["boot_id"] for e in {e["event_id"]: e for e in events}.values()
                      if e["kind"] == "press")
        return all(ids[r.boot_id] >= len(r.acked) for r in runs)

    faults: list[str] = []
    t = time.monotonic()
    final = final_boot(every_acked_press_published, faults)
    final_s = time.monotonic() - t
    events = _events(sub)
    for e in events:
        validate(f"feedback/v1/{SITE}/{EDGE}/event/{e['device']['id']}", e)

    # One seq is one event_id, one event_id one seq, one payload.
    by_id: dict[str, dict[str, Any]] = {}
    by_seq: dict[int, str] = {}
    republished = 0
    for e in events:
        first = by_id.setdefault(e["event_id"], e)
        if first is not e:
            republished += 1
            if first != e:
                faults.append(f"event {e['event_id']} published twice with different payloads:"
                              f" {first} / {e}")
        owner = by_seq.setdefault(e["seq"], e["event_id"])
        if owner != e["event_id"]:
            faults.append(f"seq {e['seq']} reused: events {owner} and {e['event_id']}")
    unique = sorted(by_id.values(), key=lambda e: e["seq"])
    rounds_by_boot = {r.boot_id: r for r in runs}
    other: Counter[str] = Counter()
    for e in unique:
        r_ = rounds_by_boot.get(e["time"]["boot_id"])
        if e["kind"] == "press" and e["device"]["id"] == DEVICE and r_ is not None:
            r_.published.append(e)
        elif e["kind"] == "device_lost" and r_ is not None:
            r_.device_lost += e["device_lost"]["lost"]
        else:
            other[e["kind"] if r_ is not None or e["kind"] != "press" else STRAY] += 1
    # seq: +1 per stored event; a gap only where a `dropped` event announces it.
    announced = {n for e in unique if e["kind"] == "dropped"
                 for n in range(e["dropped"]["from_seq"], e["dropped"]["to_seq"] + 1)}
    gaps = sorted(set(range(1, unique[-1]["seq"] + 1)) - set(by_seq) - announced) \
        if unique else []
    if gaps:
        faults.append(f"seqs missing without a `dropped` event: {gaps[:20]}")
    for e in unique:
        if e["kind"] == "dropped":
            faults.append(f"announced as dropped: {e['dropped']} (seq {e['seq']})")
    if other.get(STRAY):
        faults.append(f"{other[STRAY]} presses published with a boot_id of no round")

    print(f"  {'round':>5} {'made':>5} {'ACKed':>6} {'publ.':>6} {'stored, not ACKed':>18} "
          f"{'lost (not ACKed)':>17} {'device_lost':>11} {'doubled':>8}")
    totals: Counter[str] = Counter()
    for r in runs:
        _check_round(r)
        row = {"made": len(r.pressed), "acked": len(r.acked), "published": len(r.published),
               "stored_unacked": max(0, len(r.published) - len(r.acked)),
               "lost_unacked": max(0, len(r.pressed) - len(r.published)),
               "device_lost": r.device_lost,
               "doubled": r.doubled}
        totals.update(row)
        print(f"  {r.n:5} {row['made']:5} {row['acked']:6} {row['published']:6} "
              f"{row['stored_unacked']:18} {row['lost_unacked']:17} {row['device_lost']:11} "
              f"{row['doubled']:8}" + ("  <- " + "; ".join(r.errors) if r.errors else ""))
        faults += [f"round {r.n} (boot {r.boot_id}, cut after {r.trigger} presses + "
                   f"{r.delay_s * 1000:.0f} ms): {x}" for x in r.errors]
    print(f"  {'total':>5} {totals['made']:5} {totals['acked']:6} {totals['published']:6} "
          f"{totals['stored_unacked']:18} {totals['lost_unacked']:17} "
          f"{totals['device_lost']:11} {totals['doubled']:8}")
    offsets = [_mono_ms(e) - (a["power_up_ms"] + a["event_uptime"])
               for r in runs for e, a in zip(r.published, r.acked, strict=False)]
    if offsets:
        print(f"  press time, daemon - console: {min(offsets):+.1f} .. {max(offsets):+.1f} ms")
    print(f"  events: {len(unique)} unique ({republished} re-published copies), other kinds "
          f"{dict(other) or 'none'}; seqs {unique[0]['seq'] if unique else '-'}.."
          f"{unique[-1]['seq'] if unique else '-'}; rounds {sum(r.seconds for r in runs):.0f} s, "
          f"last boot {final_s:.0f} s, all {time.monotonic() - t0:.0f} s "
          f"(final boot's rundir {final.rundir.name}); seed {seed}")
    if summary is not None:
        print(summary(runs))
    same = [r.n for r in runs if not r.new_session]
    # A console powered up with the Pi is a new session, even when only its
    # replayed HELLO is read after a short previous session (edge/kinds/console.py).
    assert not same, f"the console's power-up was taken for the previous session in " \
                     f"round(s) {same}"
    assert not faults, f"seed {seed}:\n" + "\n".join(faults)


def _usb_power_cuts(vm: Machines, broker: Broker, sub: Subscriber,
                    validate: Callable[[str, Any], None], rounds: int) -> None:
    config = _config(broker)
    disk = vm.disk()
    run_power_cuts(sub, validate, rounds,
                   lambda r: _power_cut_round(vm, disk, config, r),
                   lambda expected, faults: _final_boot(vm, disk, config, sub, expected, faults))


def test_power_cuts_while_presses_flow_lose_and_double_nothing(
        vm: Machines, broker: Broker, subscribe: Callable[[str], Subscriber],
        validate: Callable[[str, Any], None]) -> None:
    sub = subscribe(f"feedback/v1/{SITE}/{EDGE}/event/#")
    _usb_power_cuts(vm, broker, sub, validate, 20)


@pytest.mark.soak
def test_power_cuts_soak(
        vm: Machines, broker: Broker, subscribe: Callable[[str], Subscriber],
        validate: Callable[[str, Any], None]) -> None:
    sub = subscribe(f"feedback/v1/{SITE}/{EDGE}/event/#")
    _usb_power_cuts(vm, broker, sub, validate, 200)
