"""Keyboard-class buttons and a badge reader at one desk, in-process daemon,
in-memory readers carrying real boot-report bytes, a real Mosquitto."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.keyboard import usage_char
from drivers.transport import DeviceGoneError
from edge.commands import ControlRequest
from edge.config import load_config
from edge.daemon import Daemon
from edge.kinds.base import DeviceConfig
from tests.conftest import Broker, Subscriber, wait_for, write_config


class MemoryKeyboard:
    def __init__(self) -> None:
        self.reports: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def read(self, timeout_ms: int) -> bytes | None:
        try:
            item = self.reports.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            return None
        if item is None:
            raise DeviceGoneError("unplugged")
        return item

    def write(self, data: bytes, /) -> None:
        raise DeviceGoneError("no output")

    def close(self) -> None:
        pass

    def tap(self, usage: int) -> None:
        self.reports.put(bytes([0, 0, usage, 0, 0, 0, 0, 0]))
        self.reports.put(bytes(8))

    def scan(self, badge: str) -> None:
        usage = {usage_char(u): u for u in range(0x04, 0x28)}
        for ch in badge:
            self.tap(usage[ch])
        self.tap(0x28)


@pytest.fixture
def desk(tmp_path: Path, broker: Broker) -> Iterator[tuple[Daemon, dict[str, MemoryKeyboard]]]:
    cfg_path = write_config(
        tmp_path / "edge.toml", port=broker.port, store=tmp_path / "outbox.sqlite",
        devices=[], extra="")
    cfg_path.write_text(cfg_path.read_text() + """
[badges]
04A7F3 = "op-17"
77BB01 = "op-23"

[[devices]]
kind = "keyboard"
vid = 0x1a86
pid = 0xe026
usb_port = "1-1.4"
desk = "desk-3"
keys = { "0x1e" = ["good", 1], "0x1f" = ["neutral", 0], "0x20" = ["bad", -1] }

[[devices]]
kind = "badge"
vid = 0xffff
pid = 0x0035
usb_port = "1-1.5"
desk = "desk-3"
""")
    readers = {"keyboard": MemoryKeyboard(), "badge": MemoryKeyboard()}

    def open_reader(cfg: DeviceConfig) -> MemoryKeyboard:
        return readers[cfg.kind]

    d = Daemon(load_config(cfg_path), openers={"keyboard": open_reader, "badge": open_reader},
               sysfs=tmp_path / "nosys")
    t = threading.Thread(target=d.run)
    t.start()
    yield d, readers
    d.request_stop()
    t.join(10)


def _status(d: Daemon) -> dict[str, Any]:
    box: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    d.inbox.put(ControlRequest(box))
    return box.get(timeout=5)


def _on_duty(d: Daemon) -> tuple[str | None, str]:
    desk = next(x for x in _status(d)["desks"] if x["desk"] == "desk-3")
    return desk["operator"], desk["source"]


def test_badge_scan_sets_the_operator_of_the_following_presses(
        desk: tuple[Daemon, dict[str, MemoryKeyboard]], subscribe: Callable[[str], Subscriber],
        validate: Callable[[str, Any], None], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    daemon, r = desk
    sub = subscribe("feedback/+/+/+/event/#")
    wait_for(lambda: all(x["state"] == "connected" for x in _status(daemon)["devices"]), 10,
             "both devices")

    def after(n: int) -> list[dict[str, Any]]:
        return wait_for(lambda: (e := sub.events()) and len(e) >= n and e, 10, f"{n} events")

    r["keyboard"].tap(0x1E)
    after(1)
    r["badge"].scan("04A7F3")
    wait_for(lambda: _on_duty(daemon) == ("op-17", "badge"), 5, "login")
    r["keyboard"].tap(0x20)
    r["keyboard"].tap(0x2C)  # space: not mapped
    after(2)
    r["badge"].scan("04A7F3")  # the same badge again: logged out
    wait_for(lambda: _on_duty(daemon) == (None, "none"), 5, "logout")
    r["keyboard"].tap(0x1F)
    after(3)
    r["badge"].scan("99ZZ99")  # nobody we know
    wait_for(lambda: _on_duty(daemon) == (None, "badge"), 5, "unknown badge")
    r["keyboard"].tap(0x1E)
    events = after(4)
    for m in sub.snapshot():
        validate(m.topic, m.json())
    assert [(e["press"]["label"], e["operator"]) for e in events] == [
        ("good", {"id": None, "source": "none"}),
        ("bad", {"id": "op-17", "source": "badge"}),
        ("neutral", {"id": None, "source": "none"}),
        ("good", {"id": None, "source": "badge"}),
    ]
    assert events[0]["device"]["kind"] == "keyboard"
    st = _status(daemon)
    assert "unknown_badge: unknown badge scanned at desk desk-3" in st["alarms"]
    kbd = next(d for d in st["devices"] if d["kind"] == "keyboard")
    assert kbd["decode_errors"] == {"unmapped_key": 1}
    # Badge numbers identify people: never in the log.
    assert "logged in by badge" in caplog.text
    assert "04A7F3" not in caplog.text
    assert "99ZZ99" not in caplog.text


def test_operator_command_and_bad_operator_commands(
        desk: tuple[Daemon, dict[str, MemoryKeyboard]], subscribe: Callable[[str], Subscriber],
        validate: Callable[[str, Any], None]) -> None:
    daemon, r = desk
    sub = subscribe("feedback/+/+/+/cmd/+/result")
    events = subscribe("feedback/+/+/+/event/#")
    wait_for(lambda: all(x["state"] == "connected" for x in _status(daemon)["devices"]), 10,
             "devices")
    topic = "feedback/v1/clinic-3/reception-1/cmd/operator"

    def send(payload: bytes, rid: str | None) -> dict[str, Any]:
        before = len(sub.snapshot())
        sub.client.publish(topic, payload, qos=1)
        got = wait_for(lambda: (m := sub.snapshot()) and len(m) > before and m, 10, "result")
        validate(got[-1].topic, got[-1].json())
        result: dict[str, Any] = got[-1].json()
        assert result["request_id"] == rid
        return result

    ok = send(b'{"request_id": "a", "desk": "desk-3", "operator": "op-42"}', "a")
    assert ok == {"request_id": "a", "ok": True, "error": None}
    assert _on_duty(daemon) == ("op-42", "command")
    bad = [
        (b"{not json", None, "JSON object"),
        (b'{"request_id": "b", "desk": "desk-9", "operator": "op-1"}', "b", "desk must be"),
        (b'{"request_id": "c", "desk": "desk-3", "operator": 17}', "c", "operator must be"),
        (b'{"request_id": "d", "desk": "desk-3"}', "d", "operator must be"),
        (b'{"request_id": 5, "desk": "desk-3", "operator": "x"}', None, "request_id"),
        (b'{"request_id": "e", "desk": "desk-3", "operator": "' + b"x" * 70_000 + b'"}', None,
         "64 KiB"),
        (b'["desk-3", "op-1"]', None, "JSON object"),
    ]
    for payload, rid, words in bad:
        result = send(payload, rid)
        assert result["ok"] is False
        assert words in result["error"]
        assert _on_duty(daemon) == ("op-42", "command"), payload[:40]
    r["keyboard"].tap(0x1E)
    got = wait_for(events.events, 10, "a press")
    assert got[0]["operator"] == {"id": "op-42", "source": "command"}
    assert send(b'{"request_id": "f", "desk": "desk-3", "operator": null}', "f")["ok"]
    assert _on_duty(daemon) == (None, "none")
