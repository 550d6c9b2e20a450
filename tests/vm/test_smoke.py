"""The VM tier's own smoke test: a guest boots, a kernel USB gadget enumerates
on dummy_hcd, Debian's udevd applies the project's rules to it, and the
installed daemon, run as the service user, reaches the host's Mosquitto."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable

import pytest

from tests.conftest import Broker, Subscriber
from tests.vm.assets import CHECKOUT
from tests.vm.machine import HOST, SERVICE_USER, Guest, Machines

pytestmark = pytest.mark.vm

SERIAL = "00A1B2C3D4E5"
# The console's report descriptor (shared/devices/console-hid.md): vendor page,
# input report 1 (12 bytes), output report 2 (8), feature report 3 (16).
CONSOLE_DESCRIPTOR = ("06 00 ff 09 01 a1 01 85 01 09 02 15 00 26 ff 00 75 08 95 0c 81 02 85 02 "
                      "09 03 95 08 91 02 85 03 09 04 95 10 b1 02 c0")
OUTSIDER = "nobody"  # a user outside the service group


def plug_hid_gadget(g: Guest, serial: str = SERIAL) -> None:
    """The kernel's own f_hid function as a 1209:fb02 console (no firmware behind it)."""
    # Octal escapes: the guest's sh is Debian's dash, whose printf has no \x.
    desc = "".join(f"\\{int(b, 16):03o}" for b in CONSOLE_DESCRIPTOR.split())
    g.run(f"""set -e
G=/sys/kernel/config/usb_gadget/smoke
mkdir $G && cd $G
echo 0x1209 > idVendor; echo 0xfb02 > idProduct
mkdir strings/0x409
echo {shlex.quote(serial)} > strings/0x409/serialnumber
echo "Seed Feedback" > strings/0x409/manufacturer
echo "Feedback Console FC-3" > strings/0x409/product
mkdir configs/c.1 functions/hid.usb0
echo 0 > functions/hid.usb0/protocol; echo 0 > functions/hid.usb0/subclass
echo 13 > functions/hid.usb0/report_length
printf '{desc}' > functions/hid.usb0/report_desc
ln -s functions/hid.usb0 configs/c.1/
ls /sys/class/udc | head -n 1 > UDC
""")


def test_udev_gives_the_console_to_the_service_user_only(vm: Machines) -> None:
    g = vm.boot(udcs=2)
    assert g.run("ls /sys/class/udc").stdout.split() == ["dummy_udc.0", "dummy_udc.1"]
    plug_hid_gadget(g)
    link = f"/dev/feedback/console-{SERIAL}"
    # Until udevd has handled the hidraw node: enumeration on dummy_hcd takes
    # a moment after the UDC is bound, so `udevadm settle` alone could be early.
    g.run(f"udevadm wait --timeout=30 {link}")

    node = g.run(f"readlink -f {link}").stdout.strip()
    assert node.startswith("/dev/hidraw"), node
    owner, group, mode = g.run(f"stat -c '%U %G %a' {node}").stdout.split()
    assert (owner, group, mode) == ("root", SERVICE_USER, "660")
    usb = g.run(f"udevadm info --query=property --name={node}").stdout
    assert f"ID_SERIAL_SHORT={SERIAL}" in usb

    # Opened read-write as each user would (the shell's <> is open(O_RDWR)).
    service = g.run(f": <> {link}", user=SERVICE_USER, check=False)
    assert service.status == 0, service.stderr
    outsider = g.run(f": <> {link}", user=OUTSIDER, check=False)
    assert outsider.status != 0
    assert "Permission denied" in outsider.stderr

    python = g.run("python3 -c pass", user=SERVICE_USER)
    imports = g.run("/opt/feedback-edge/venv/bin/python -c 'import edge.daemon, edge.cli'",
                    user=SERVICE_USER)
    t = time.monotonic()
    g.poweroff()
    print(f"\nVM times: QEMU start to ready {g.timings['boot_s']:.1f} s "
          f"(guest uptime {g.timings['guest_uptime_at_ready_s']:.1f} s); "
          f"python3 -c pass {python.seconds:.2f} s; the daemon's imports "
          f"{imports.seconds:.2f} s; power-off {time.monotonic() - t:.1f} s; "
          f"QEMU start to exit {g.timings['qemu_s']:.1f} s")


def test_the_installed_daemon_reaches_the_hosts_broker(
        vm: Machines, broker: Broker, subscribe: Callable[[str], Subscriber]) -> None:
    sub = subscribe("feedback/v1/vm-site/vm-edge/status")
    g = vm.boot(disk=vm.disk())
    t = time.monotonic()
    pid = g.start_daemon(f"""\
site = "vm-site"
edge = "vm-edge"

[broker]
host = "{HOST}"
port = {broker.port}
allow_plaintext = true
""")
    g.wait_for(lambda: [m for m in sub.snapshot() if m.json()["state"] == "online"], 120,
                        "the daemon's online status at the host's broker")
    connected = time.monotonic() - t
    # It runs unprivileged from the Pi's path, and its store is on the disk.
    proc = g.run(f"stat -c %U /proc/{pid}; tr '\\0' '\\n' < /proc/{pid}/cmdline").stdout
    user, *argv = proc.split()
    assert user == SERVICE_USER
    assert argv[1:3] == ["/opt/feedback-edge/venv/bin/feedback-edge", "run"], argv
    store = g.run("stat -c '%U %a' /var/lib/feedback-edge/outbox.sqlite; "
                  "findmnt -n -o FSTYPE /var/lib/feedback-edge").stdout.split()
    assert store == [SERVICE_USER, "600", "ext4"]
    g.poweroff()
    print(f"\nVM: daemon start to online at the host's broker {connected:.1f} s")


def test_a_power_cut_keeps_what_reached_the_disk_and_it_boots_again(vm: Machines) -> None:
    disk = vm.disk()
    g = vm.boot(disk=disk)
    # On the disk at the service's state directory, written and synced by the
    # service user as the daemon's store would be.
    g.run("echo kept > /var/lib/feedback-edge/synced && sync /var/lib/feedback-edge/synced",
          user=SERVICE_USER)
    g.power_cut()
    again = vm.boot(disk=disk)
    assert again.run("cat /var/lib/feedback-edge/synced").stdout == "kept\n"
    assert "recovery complete" in again.run("dmesg").stdout  # ext4 replayed its journal
    again.poweroff()


def test_a_scenario_runs_with_the_checkout_importable_then_powers_off(vm: Machines) -> None:
    # What a guest-side scenario is given: the checkout's code under
    # checkout-python (firmware_sim's USB backends run so), the share, root.
    g = vm.boot(ready=False, scenario="""#!/bin/sh
set -e
checkout-python -c 'import firmware_sim, sys; print(firmware_sim.__file__)' > /share/imported
id -u > /share/uid
""")
    assert g.scenario_status(timeout=120) == 0, (g.share / "scenario.log").read_text()
    assert g.wait_stopped() == 0
    assert (g.share / "imported").read_text().startswith(str(CHECKOUT / "firmware_sim"))
    assert (g.share / "uid").read_text() == "0\n"
    print(f"\nVM: scenario boot, QEMU start to exit {g.timings['qemu_s']:.1f} s")
