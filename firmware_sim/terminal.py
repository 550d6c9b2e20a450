"""The ST-3000 survey terminal's firmware, as the device sheet describes it.

- Records (ANSWER, PRESENCE, ABANDONED) go to flash first (a JSON file,
  replaced atomically, so a power cut leaves the old or the new state); up to
  500 unacknowledged ones are kept, the oldest dropped beyond that.  Record
  ids come from a counter in the same flash: they never repeat.
- One record is in flight at a time, oldest first; it is retransmitted every
  2 s (same frame seq, same id, fresh age_ms) until the host ACKs its seq.
- PING every 10 s when idle; PONG to the host's PING; DOCTORS and TIME are
  stored and ACKed.
- After power-up, and whenever the host opens the port, a lone 0x00 and then
  HELLO are sent and the unacknowledged records replayed (the 0x00 lets a
  host that discards bytes up to the first delimiter keep the HELLO).  An
  RS-232 unit cannot see the host open the port (`TerminalServer(rs232=True)`
  never calls `set_sender` again); it says HELLO only at power-up and when the
  host asks with WHO.
- WHO is answered with the lone 0x00 and HELLO, and nothing else changes: the
  record in flight keeps its seq and its 2 s retransmission (WHO asks who is
  there; it is not a reconnect).
- `drop_oldest()` is the service technician removing the oldest record from
  flash (a record the host keeps refusing blocks all the others).
- The survey rules are kept (q2 only after "no", phone and comment only
  after q2 "yes"); `answer(..., force=True)` sends a rule-breaking record on
  purpose, for tests of the host's `schema` NAK.

Time comes from `clock_ms()` (the terminal's real-time clock, in ms): tests
inject a manual one; nothing here sleeps.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drivers.terminal import (
    Acked,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
)
from edge.state import write_atomic

__all__ = ["TerminalFirmware"]

FLASH_RECORDS = 500
RETRANSMIT_MS = 2000
PING_MS = 10_000


class TerminalFirmware:
    def __init__(self, serial: str, flash: Path, *, clock_ms: Callable[[], int],
                 send: Callable[[bytes], None] | None = None, fw: str = "2.3.1") -> None:
        self.serial = serial
        self.fw = fw
        self._flash_path = flash
        self._clock = clock_ms
        self._send_cb = send
        self._lock = threading.RLock()
        self.naks: list[dict[str, Any]] = []
        self.time_set: int | None = None
        self.pongs = 0
        self.whos = 0
        self.powered = False
        self.power_up()

    # -- flash -----------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self._flash_path.read_bytes())
        except (FileNotFoundError, ValueError):
            data = {}
        data.setdefault("next_id", 1)
        data.setdefault("records", [])
        data.setdefault("doctors_rev", 0)
        data.setdefault("doctors", [])
        data.setdefault("script_done", 0)
        return data

    def _save(self) -> None:
        write_atomic(self._flash_path, json.dumps(self.flash).encode())

    # -- power and link ----------------------------------------------------------

    def power_up(self) -> None:
        with self._lock:
            self.flash = self._load()
            self.powered = True
            self._seq = 0
            self._decoder = FrameDecoder(synced=True)
            self._in_flight: tuple[int, int] | None = None  # (record id, frame seq)
            self._next_send = 0
            self._last_tx = self._clock()
            self.hello()

    def power_cut(self) -> None:
        with self._lock:
            self.powered = False

    def set_sender(self, send: Callable[[bytes], None] | None) -> None:
        """The host opened the port (or closed it, with None)."""
        with self._lock:
            self._send_cb = send
            if send is not None and self.powered:
                self._decoder = FrameDecoder(synced=True)
                self.hello()

    def hello(self) -> None:
        """Power-up or a (re)connect: HELLO, then replay from the oldest record."""
        with self._lock:
            self._in_flight = None
            self._announce()
            self._pump(force=True)

    def _announce(self) -> None:
        # A lone 0x00 first: a host that has just opened the port drops
        # everything up to the first delimiter, and HELLO must survive.
        if self._send_cb is not None:
            self._send_cb(b"\x00")
        self._tx(FrameType.HELLO, {"serial": self.serial, "model": "ST-3000",
                                   "fw": self.fw, "doctors_rev": self.flash["doctors_rev"],
                                   "unacked": len(self.flash["records"])})

    def _tx(self, ftype: FrameType, payload: dict[str, Any], seq: int | None = None) -> int:
        if seq is None:
            self._seq = (self._seq + 1) & 0xFFFF
            seq = self._seq
        self._last_tx = self._clock()
        if self._send_cb is not None:
            self._send_cb(encode_frame(ftype, seq, payload))
        return seq

    # -- records ---------------------------------------------------------------------

    def _record(self, kind: str, fields: dict[str, Any]) -> int:
        with self._lock:
            rid = int(self.flash["next_id"])
            self.flash["next_id"] = rid + 1
            self.flash["records"].append({"kind": kind, "id": rid, "at": self._clock(),
                                          **fields})
            del self.flash["records"][:-FLASH_RECORDS]
            self._save()
            self._pump()
            return rid

    def answer(self, doctor: str, q1: str, *, q2: str | None = None, phone: str | None = None,
               comment: str | None = None, lang: str = "en", force: bool = False) -> int:
        if not force:
            if q2 is not None and q1 != "no":
                raise ValueError("q2 only after q1 = no")
            if q2 is None and q1 == "no":
                raise ValueError("q1 = no needs q2 (may we call you?): yes or no")
            if q2 != "yes" and (phone or comment):
                raise ValueError("phone and comment only after q2 = yes")
        return self._record("answer", {"doctor": doctor, "q1": q1, "q2": q2, "phone": phone,
                                       "comment": comment, "lang": lang})

    def presence(self, approaches: int, engaged: int, period_ms: int = 60_000) -> int:
        return self._record("presence", {"approaches": approaches, "engaged": engaged,
                                         "period_ms": period_ms})

    def abandoned(self, doctor: str | None, step: str) -> int:
        return self._record("abandoned", {"doctor": doctor, "step": step})

    def add(self, step: dict[str, Any]) -> int:
        """A record described as a day script or a control request describes it:
        `{"kind": "answer" | "presence" | "abandoned", ...its fields}` (`after_ms` and
        `force` are the script's); its id.  Raises ValueError for an unknown kind,
        TypeError for fields the kind does not take or a step that is no object."""
        if not isinstance(step, dict):
            raise TypeError('a record is {"kind": "answer", ...}')
        fields = {k: v for k, v in step.items() if k not in ("kind", "after_ms", "force")}
        kind = step.get("kind")
        if kind == "answer":
            return self.answer(force=bool(step.get("force")), **fields)
        if kind == "presence":
            return self.presence(**fields)
        if kind == "abandoned":
            return self.abandoned(**fields)
        raise ValueError(f"unknown record kind {kind!r}: answer, presence or abandoned")

    def play(self, script: list[dict[str, Any]], elapsed_ms: int) -> None:
        """The script's steps due `elapsed_ms` after it started, each once: the step
        count advances before the record is written, so both land in the same
        atomic flash write and a power cut never plays a step twice."""
        done = int(self.flash["script_done"])
        while done < len(script) and script[done]["after_ms"] <= elapsed_ms:
            self.flash["script_done"] = done + 1
            self.add(script[done])
            done += 1

    def _payload(self, rec: dict[str, Any]) -> tuple[FrameType, dict[str, Any]]:
        body = {k: v for k, v in rec.items() if k not in ("kind", "at")}
        body["age_ms"] = max(0, self._clock() - int(rec["at"]))
        kind = {"answer": FrameType.ANSWER, "presence": FrameType.PRESENCE,
                "abandoned": FrameType.ABANDONED}[rec["kind"]]
        return kind, body

    def _pump(self, force: bool = False) -> None:
        """Send (or retransmit) the oldest unacknowledged record."""
        if not self.powered or not self.flash["records"]:
            self._in_flight = None
            return
        rec = self.flash["records"][0]
        now = self._clock()
        if self._in_flight is not None and self._in_flight[0] == rec["id"]:
            if not force and now < self._next_send:
                return
            seq: int | None = self._in_flight[1]  # a retransmission repeats the seq
        else:
            seq = None
        kind, body = self._payload(rec)
        sent = self._tx(kind, body, seq)
        self._in_flight = (int(rec["id"]), sent)
        self._next_send = now + RETRANSMIT_MS

    # -- from the host -------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        with self._lock:
            if not self.powered:
                return
            for item in self._decoder.feed(data):
                if isinstance(item, Frame):
                    self._on_frame(item)

    def _on_frame(self, f: Frame) -> None:
        try:
            body = json.loads(f.payload)
        except ValueError:
            return
        if f.type == FrameType.ACK:
            acked = Acked(int(body.get("ack", -1)))
            if self._in_flight is not None and acked.ack == self._in_flight[1]:
                rid = self._in_flight[0]
                self.flash["records"] = [r for r in self.flash["records"] if r["id"] != rid]
                self._save()
                self._in_flight = None
                self._pump()
        elif f.type == FrameType.NAK:
            self.naks.append(body)
        elif f.type == FrameType.PING:
            self._tx(FrameType.PONG, {})
        elif f.type == FrameType.PONG:
            self.pongs += 1
        elif f.type == FrameType.DOCTORS:
            self.flash["doctors_rev"] = int(body["rev"])
            self.flash["doctors"] = body["doctors"]
            self._save()
            self._tx(FrameType.ACK, {"ack": f.seq})
        elif f.type == FrameType.TIME:
            self.time_set = int(body["unix_ms"])
            self._tx(FrameType.ACK, {"ack": f.seq})
        elif f.type == FrameType.WHO:
            self.whos += 1
            self._announce()

    def drop_oldest(self) -> int | None:
        """Remove the oldest record from flash (a technician's repair); its id."""
        with self._lock:
            if not self.flash["records"]:
                return None
            rid = int(self.flash["records"].pop(0)["id"])
            self._save()
            self._in_flight = None
            self._pump()
            return rid

    def tick(self) -> None:
        with self._lock:
            if not self.powered:
                return
            self._pump()
            if not self.flash["records"] and self._clock() - self._last_tx >= PING_MS:
                self._tx(FrameType.PING, {})

    def next_due_ms(self) -> int:
        with self._lock:
            due = self._last_tx + PING_MS
            if self.flash["records"]:
                due = min(due, self._next_send)
            return due

    @property
    def unacked(self) -> int:
        with self._lock:
            return len(self.flash["records"])
