"""The systemd unit, sysusers and udev files the Pi installs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from edge.config import load_config
from edge.deploy import udev_rules

UNITS = Path(__file__).resolve().parent.parent / "systemd"


def _installed_unit(tmp_path: Path) -> Path:
    # verify checks that ExecStart exists: point it at this checkout's script.
    script = Path(sys.executable).parent / "feedback-edge"
    exe = str(script) if script.exists() else shutil.which("feedback-edge")
    assert exe, "feedback-edge console script not installed"
    unit = tmp_path / "feedback-edge.service"
    unit.write_text((UNITS / "feedback-edge.service").read_text().replace(
        "/opt/feedback-edge/venv/bin/feedback-edge", exe))
    return unit


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    out = subprocess.run(["systemd-analyze", "verify", "--man=no",
                          str(_installed_unit(tmp_path))], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr


def test_the_unit_is_notify_with_a_watchdog_and_a_tight_sandbox(tmp_path: Path) -> None:
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=20",
                          str(_installed_unit(tmp_path))], capture_output=True, text=True,
                         check=False)
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert score is not None, out.stdout[-500:]
    assert float(score[1]) <= 2.0
    text = (UNITS / "feedback-edge.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=always", "User=feedback-edge",
                 "DevicePolicy=closed", "ProtectSystem=strict", "NoNewPrivileges=yes",
                 "CapabilityBoundingSet=\n"):
        assert line in text


def test_a_config_error_fails_once_instead_of_restarting_forever(tmp_path: Path) -> None:
    """The daemon exits 2 on a config error (and on another instance); the unit
    does not restart on 2, so `systemctl status` shows the failure once."""
    unit = (UNITS / "feedback-edge.service").read_text()
    prevent = re.search(r"^RestartPreventExitStatus=(.+)$", unit, re.MULTILINE)
    assert prevent is not None
    assert "2" in prevent[1].split()
    bad = tmp_path / "edge.toml"
    bad.write_text('site = "clinic-3"\nedge = "reception-1"\n[broker]\nhost = "localhost"\n'
                   "port = 99999\n")
    out = subprocess.run([sys.executable, "-m", "edge.cli", "run", "--config", str(bad)],
                         capture_output=True, text=True, check=False, timeout=30)
    assert out.returncode == 2
    assert "broker.port = 99999" in out.stderr
    assert "Traceback" not in out.stderr


def test_sysusers_file_declares_the_service_user() -> None:
    text = (UNITS / "feedback-edge.sysusers").read_text()
    assert re.search(r"^u feedback-edge - ", text, re.M)


def test_static_rules_cover_consoles_and_terminals_with_stable_names() -> None:
    text = (UNITS / "70-feedback-edge.rules").read_text()
    assert 'ATTRS{idProduct}=="fb02"' in text
    assert "feedback/console-$env{ID_SERIAL_SHORT}" in text
    assert "feedback/terminal-$env{ID_SERIAL_SHORT}" in text
    assert 'ENV{ID_MM_DEVICE_IGNORE}="1"' in text


def test_generated_rules_name_keyboard_class_devices_as_the_config_does(tmp_path: Path) -> None:
    cfg = tmp_path / "edge.toml"
    cfg.write_text('site = "s"\nedge = "e"\n[broker]\nhost = "localhost"\n'
                   '[[devices]]\nkind = "badge"\nvid = 0xffff\npid = 0x0035\n'
                   'usb_port = "1-1.5"\ndesk = "desk-2"\n'
                   '[[devices]]\nkind = "keyboard"\nvid = 0x1a86\npid = 0xe026\n'
                   'serial = "BB01"\ndesk = "desk-2"\nkeys = { "0x1e" = ["good", 1] }\n')
    rules = udev_rules(load_config(cfg))
    assert 'SUBSYSTEM=="input", KERNEL=="event*", ATTRS{idVendor}=="ffff", ' \
           'ATTRS{idProduct}=="0035", KERNELS=="1-1.5", GROUP="feedback-edge"' in rules
    assert 'ATTRS{idVendor}=="1a86", ATTRS{idProduct}=="e026", ATTRS{serial}=="BB01"' in rules
    out = subprocess.run([sys.executable, "-m", "edge.cli", "udev-rules", "--config", str(cfg)],
                         capture_output=True, text=True, check=True)
    assert out.stdout == rules
