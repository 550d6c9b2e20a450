"""firmware_sim's USB backends in the guest: the console (FunctionFS HID), the
terminal (CDC-ACM) and the keyboard-class devices (f_hid boot keyboards) as
real USB devices, checked from the host side of the guest's USB stack.

The checks themselves run inside the guest (`firmware_sim.usb.selfcheck`:
hidraw, evdev, ttyACM and usbfs ioctls need the guest's kernel); each prints
one PASS/FAIL line with its figures, shown here with `-s`.  The last test
drives the backends as a daemon test would: through the project's udev
links, as the service user, with `feedback-sim`'s own clients."""

from __future__ import annotations

import shlex

import pytest

from tests.vm.assets import CHECKOUT
from tests.vm.machine import SERVICE_USER, Guest, Machines

pytestmark = pytest.mark.vm

UDCS = 6  # the selfcheck plugs up to five gadgets at once


def _selfcheck(g: Guest, only: str, timeout: float = 400) -> None:
    r = g.run(f"cd /tmp && checkout-python -m firmware_sim.usb.selfcheck --dir /tmp/check "
              f"--only {only}", timeout=timeout, check=False)
    print(f"\n{r.stdout}{r.stderr}")
    logs = g.run("tail -n 20 /tmp/check/*.log", check=False).stdout
    assert r.status == 0, f"{r.stdout}{r.stderr}\n--- simulator logs ---\n{logs}"


def test_the_console_backend_is_a_usb_hid_device(vm: Machines) -> None:
    # Enumeration (1209:fb02, serial, strings), the report descriptor, presses
    # byte for byte on hidraw, output reports (interrupt OUT and SET_REPORT on
    # ep0), the info feature report and its stall/zeros fallbacks, reports
    # waiting in the endpoint, unplug/plug, two consoles by serial.
    g = vm.boot(udcs=UDCS)
    _selfcheck(g, "console")
    g.poweroff()


def test_the_terminal_and_keyboard_backends(vm: Machines) -> None:
    # The terminal on /dev/ttyACM0 (WHO -> HELLO, a record and its ACK,
    # unplug/plug), a button box's keys on hidraw and evdev, EVIOCGRAB, a
    # badge scan decoded by the daemon's own decoders.
    g = vm.boot(udcs=UDCS)
    _selfcheck(g, "terminal,keyboard")
    g.poweroff()


def test_the_backends_through_udev_as_the_service_user(vm: Machines) -> None:
    g = vm.boot(udcs=2)
    console_serial, terminal_serial = "00A1B2C3D4E5", "00C0FFEE0001"
    # argv, not a shell line: the pid is the simulator's own, for the SIGTERM below.
    sim = ["checkout-python", "-m", "firmware_sim.usb"]
    g.spawn([*sim, "console", "--serial", console_serial, "--control", "/run/console.ctl"],
            name="console")
    g.spawn([*sim, "terminal", "--serial", terminal_serial, "--flash", "/tmp/st3.flash",
             "--control", "/run/terminal.ctl"], name="terminal")
    link = f"/dev/feedback/console-{console_serial}"
    tlink = f"/dev/feedback/terminal-{terminal_serial}"
    # A simulator's control socket appears once its gadget is plugged in.
    g.run("until [ -S /run/console.ctl ] && [ -S /run/terminal.ctl ]; do sleep 0.1; done",
          timeout=90)
    g.run(f"udevadm wait --timeout=60 {link} {tlink}", timeout=90)
    by_id = g.run(f"ls /dev/serial/by-id/*_{terminal_serial}-if00").stdout.strip()

    # A press said the way a socket-simulator test says it, read as the service
    # user through the udev link.
    reader = f"""
import os, select
fd = os.open({link!r}, os.O_RDWR)
print("open", flush=True)
while select.select([fd], [], [], 10)[0]:
    report = os.read(fd, 64)
    if report[2] == 1:  # a PRESS; the unacknowledged HELLO is replayed meanwhile
        print(report.hex())
        raise SystemExit(0)
raise SystemExit("no PRESS report")
"""
    g.put("/tmp/reader.py", reader)
    g.spawn(["python3", "/tmp/reader.py"], name="reader", user=SERVICE_USER)
    g.wait_for(lambda: "open" in (g.share / "reader.log").read_text(), 60, "the reader")
    g.run("checkout-python -m firmware_sim.cli console press bad --socket /run/console.ctl")
    assert g.wait_exit("reader", 30) == 0, (g.share / "reader.log").read_text()
    report = bytes.fromhex((g.share / "reader.log").read_text().split()[-1])
    assert (report[0], report[2], report[3]) == (1, 1, 2)  # report 1, PRESS, "bad"
    state = g.run("checkout-python -m firmware_sim.cli console state --socket /run/console.ctl")
    assert report.hex() in state.stdout  # the very bytes the firmware sent (usb.in_log)

    # The terminal through its by-id link, as the service user: WHO -> HELLO.
    # WHO until a HELLO, as the daemon asks: bytes that waited in the device
    # reach the port before it is raw and are echoed back (n_tty's default
    # ECHO), so the first WHO can arrive glued to that noise.
    who = f"""
import os, select, tty
from drivers.terminal import FrameDecoder, FrameType, encode_frame
fd = os.open({by_id!r}, os.O_RDWR | os.O_NOCTTY)
tty.setraw(fd)
dec = FrameDecoder()
for seq in range(1, 11):
    os.write(fd, b"\\0" + encode_frame(FrameType.WHO, seq, {{}}))
    while select.select([fd], [], [], 1)[0]:
        for f in dec.feed(os.read(fd, 4096)):
            if getattr(f, "type", None) == FrameType.HELLO:
                print(f"{{seq}} {{f.payload.decode()}}")
                raise SystemExit(0)
raise SystemExit("no HELLO")
"""
    g.put("/tmp/who.py", who)
    r = g.run(f"cd /tmp && PYTHONPATH={shlex.quote(str(CHECKOUT))} python3 /tmp/who.py",
              user=SERVICE_USER, timeout=60)
    assert f'"serial":"{terminal_serial}"' in r.stdout
    for node in (link, tlink):
        outsider = g.run(f": <> {node}", user="nobody", check=False)
        assert outsider.status != 0
        assert "Permission denied" in outsider.stderr

    # Both take their gadgets apart on SIGTERM.
    g.run("kill -TERM $(cat /share/.vm/proc/console.pid) $(cat /share/.vm/proc/terminal.pid)")
    assert g.wait_exit("console", 30) == 0
    assert g.wait_exit("terminal", 30) == 0
    assert g.run("ls /sys/kernel/config/usb_gadget").stdout.split() == []
    g.poweroff()
