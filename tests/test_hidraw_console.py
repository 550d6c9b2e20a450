"""The stdlib hidraw console transport (every Pi reads consoles through it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drivers.console import ConsoleReport, ReportType, decode_report, encode_report
from drivers.hidraw_transport import HidrawConsole, hidiocgfeature
from drivers.transport import DeviceGoneError
from tests.test_discovery import make_sysfs


def test_hidiocgfeature_matches_the_kernel_header_formula() -> None:
    # _IOC(_IOC_WRITE|_IOC_READ, 'H', 0x07, len): dir 3 << 30, size << 16, type << 8, nr.
    assert hidiocgfeature(64) == 0xC0404807
    assert hidiocgfeature(8) == 0xC0084807


def test_finds_the_console_node_by_identity_like_hidapi(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    sysfs = make_sysfs(tmp_path / "sys")
    opened: list[Path] = []
    monkeypatch.setattr(HidrawConsole, "__init__",
                        lambda self, node: opened.append(node))
    HidrawConsole.find(0x1209, 0xFB02, "00A1B2C3D4E5", sysfs)
    HidrawConsole.find(0x1209, 0xFB02, None, sysfs)
    assert opened == [Path("/dev/hidraw0"), Path("/dev/hidraw0")]
    with pytest.raises(DeviceGoneError, match="with that serial"):
        HidrawConsole.find(0x1209, 0xFB02, "SOMEONE-ELSE", sysfs)
    with pytest.raises(DeviceGoneError, match="no hidraw node"):
        HidrawConsole.find(0x1209, 0xFB30, None, sysfs)  # the terminal is a tty, not hidraw


def test_reports_cross_the_node_whole(tmp_path: Path) -> None:
    # A FIFO stands in for the character device: one write is one report, as
    # hidraw delivers them; what the kernel would do with an ioctl it cannot.
    fifo = tmp_path / "hidraw0"
    os.mkfifo(fifo)
    dev = HidrawConsole(fifo)
    try:
        assert dev.read(10) is None
        sent = ConsoleReport(7, ReportType.PRESS, 2, replay=False, overflow=False,
                             event_uptime=10_000, now_uptime=10_040)
        dev.write(encode_report(sent))
        got = dev.read(1000)
        assert got is not None
        assert decode_report(got, 3) == sent
        with pytest.raises(DeviceGoneError):
            dev.get_feature(0x03, 64)
    finally:
        dev.close()
