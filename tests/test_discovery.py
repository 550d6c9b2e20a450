"""USB discovery over a sysfs tree built on disk, and `feedback-edge devices`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from drivers.usb_discovery import classify, scan
from edge.kinds import MATCHERS


def _usb(root: Path, name: str, vid: str, pid: str, serial: str | None,
         interfaces: list[tuple[str, str, str]], nodes: list[str], product: str) -> None:
    real = root / "devices" / "pci0000:00" / "0000:00:14.0" / "usb1" / name
    real.mkdir(parents=True)
    (real / "idVendor").write_text(vid + "\n")
    (real / "idProduct").write_text(pid + "\n")
    (real / "product").write_text(product + "\n")
    if serial is not None:
        (real / "serial").write_text(serial + "\n")
    for i, (cls, sub, proto) in enumerate(interfaces):
        intf = real / f"{name}:1.{i}"
        intf.mkdir()
        (intf / "bInterfaceClass").write_text(cls)
        (intf / "bInterfaceSubClass").write_text(sub)
        (intf / "bInterfaceProtocol").write_text(proto)
    for node in nodes:
        (real / f"{name}:1.0" / node).mkdir(parents=True)
    links = root / "bus" / "usb" / "devices"
    links.mkdir(parents=True, exist_ok=True)
    (links / name).symlink_to(real)


def make_sysfs(root: Path) -> Path:
    _usb(root, "1-1.2", "1209", "fb02", "00A1B2C3D4E5", [("03", "00", "00")],
         ["0003:1209:FB02.0001/hidraw/hidraw0"], "Feedback Console FC-3")
    _usb(root, "1-1.3", "1209", "fb30", "00C0FFEE0001", [("02", "02", "01"), ("0a", "00", "00")],
         ["tty/ttyACM0"], "Survey Terminal ST-3000")
    _usb(root, "1-1.4", "ffff", "0035", None, [("03", "01", "01")],
         ["0003:FFFF:0035.0003/hidraw/hidraw1", "0003:FFFF:0035.0003/input/input7/event4"],
         "RFID Reader")
    _usb(root, "1-1.5", "046d", "c077", None, [("03", "01", "02")],
         ["0003:046D:C077.0004/input/input8/event5"], "USB Optical Mouse")
    (root / "bus" / "usb" / "devices" / "usb1").mkdir()  # a root hub: not a device
    return root


def test_scan_reads_identity_interfaces_and_nodes(tmp_path: Path) -> None:
    found = {d.port_path: d for d in scan(make_sysfs(tmp_path))}
    assert sorted(found) == ["1-1.2", "1-1.3", "1-1.4", "1-1.5"]
    console = found["1-1.2"]
    assert (console.ident, console.serial, console.hidraw) == \
        ("1209:fb02", "00A1B2C3D4E5", ("/dev/hidraw0",))
    assert found["1-1.3"].tty == ("/dev/ttyACM0",)
    reader = found["1-1.4"]
    assert (reader.serial, reader.hidraw, reader.event) == \
        (None, ("/dev/hidraw1",), ("/dev/input/event4",))
    assert [classify(found[p], MATCHERS) for p in sorted(found)] == \
        ["console", "terminal", "keyboard", None]


def test_devices_command_lists_configured_unconfigured_and_foreign(tmp_path: Path) -> None:
    sysfs = make_sysfs(tmp_path / "sys")
    cfg = tmp_path / "edge.toml"
    cfg.write_text('site = "s"\nedge = "e"\n[broker]\nhost = "localhost"\n[[devices]]\n'
                   'kind = "console"\nserial = "00A1B2C3D4E5"\ndesk = "desk-2"\n')
    run = [sys.executable, "-m", "edge.cli", "devices", "--config", str(cfg), "--sysfs",
           str(sysfs)]
    rows = json.loads(subprocess.run([*run, "--json"], capture_output=True, check=True).stdout)
    by_port = {r["port_path"]: r for r in rows}
    assert by_port["1-1.2"]["state"] == "configured"
    assert by_port["1-1.2"]["desk"] == "desk-2"
    assert by_port["1-1.3"]["state"] == "unconfigured"
    assert by_port["1-1.5"]["state"] == "not ours"
    text = subprocess.run(run, capture_output=True, check=True, text=True).stdout
    assert 'kind = "terminal"\nserial = "00C0FFEE0001"' in text
    assert 'usb_port = "1-1.4"' in text
    assert "vid = 0xffff" in text
    # The blocks it prints are a valid config once the desk is set.
    snippet = text.split("add to edge.toml (and set the desk):")[1]
    cfg.write_text(cfg.read_text() + snippet.replace("CHANGE-ME", "office-12"))
    check = subprocess.run([sys.executable, "-m", "edge.cli", "check-config", str(cfg)],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
