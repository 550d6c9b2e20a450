"""The guest-side driver of simulated devices, shared by the VM tier's tests."""

__all__ = ["DRIVER"]

# Guest side: runs a JSON list of steps against simulators' control sockets
# (firmware_sim's own clients) and prints one JSON list of replies.  "until"
# polls a simulator's state locally until a figure is reached, so a test can
# act at the right moment of a stream (the host's round trip is seconds).
DRIVER = r'''
import json, sys, time
from pathlib import Path
from firmware_sim.server import control
from firmware_sim.usb.keyboard import type_request


def figure(state, key):
    if key == "acked_presses":
        return sum(1 for a in state["acked"] if a[1] == "PRESS")
    if key == "leds":
        return len(state["leds"])
    return state[key]


def run(step):
    op, *a = step
    if op == "clock":
        return {"boot_ns": time.clock_gettime_ns(time.CLOCK_BOOTTIME), "wall_ns": time.time_ns()}
    ctl = Path(a[0])
    if op == "press":
        req = {"button": a[1], "hold_ms": 80, "delay_ms": a[2] if len(a) > 2 else 0}
        return control(ctl, b"P", json.dumps(req).encode())
    if op == "x":
        return control(ctl, b"X", a[1].encode())
    if op == "answer":
        return control(ctl, b"A", json.dumps(a[1]).encode())
    if op == "type":
        return type_request(ctl, a[1])
    if op == "until":
        key, cmp, value, timeout = a[1:]
        deadline = time.monotonic() + timeout
        while True:
            state = control(ctl, b"X", b"state")
            got = figure(state, key)
            if got >= value if cmp == ">=" else got == value:
                return state
            if time.monotonic() > deadline:
                raise SystemExit(f"{ctl}: {key} is {got}, not {cmp} {value} after {timeout} s")
            time.sleep(0.02)
    raise SystemExit(f"unknown step {op}")


replies = []
for s in json.loads(sys.argv[1]):
    reply = run(s)
    if isinstance(reply, dict) and reply.get("ok") is False:
        raise SystemExit(f"{s}: {reply}")
    replies.append(reply)
print(json.dumps(replies))
'''
