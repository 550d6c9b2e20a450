"""Commands to the daemon, from MQTT and from the local control socket, through
one dispatcher on the main loop.

MQTT (mqtt-contract.md, "Commands"): `{root}/cmd/{name}` with a JSON object
of at most `MAX_COMMAND_BYTES` holding a `request_id` (string, at most 128
characters); the result `{"request_id", "ok", "error"}` goes to
`{root}/cmd/{name}/result`.  Names: `ping`, `operator` (`desk`, `operator`:
an operator id, edge.contract.ids.OPERATOR_RE, or null for "nobody"), `doctors` (`rev`,
`doctors`: edge.doctors.validate_doctors).  Retained commands are ignored
(the daemon decides that before calling here).

Control socket (edge/control.py): `{"cmd": "status"}` answers the status
object; `{"cmd": "operator", "desk", "operator"}` logs in and `{"cmd":
"operator", "desk", "logout": true}` ends the desk's login.

What came from outside is checked against its grammar before it is used, and
logged only through `edge.logsafe.printable`.  Every refusal is counted in
`Commands.refused` (shown in `status`): by the command's name (`unknown` for
any other name), `control` for the control socket, and what the daemon refuses
before it gets here: `retained` commands and malformed collector `ack`s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any, Final

from edge.clock import Clock
from edge.contract.ids import OPERATOR_RULE, valid_operator
from edge.doctors import DoctorList, validate_doctors
from edge.kinds.base import Device, Doctors
from edge.logsafe import printable
from edge.operators import Operators

__all__ = ["COMMANDS", "MAX_COMMAND_BYTES", "Commands", "ControlRequest", "json_field",
           "watermark"]

log = logging.getLogger(__name__)

# A larger payload is answered with an error.  Nothing much larger ever reaches
# the daemon: its CONNECT advertises MQTT v5 Maximum Packet Size
# edge.mqtt.MAX_PACKET_BYTES (256 KiB, room for a 64 KiB command and its
# topic), so the broker drops bigger messages for us instead of sending them.
MAX_COMMAND_BYTES: Final = 65536
COMMANDS: Final = ("doctors", "operator", "ping")
# ack.schema.json's range of a watermark; beyond it SQLite cannot compare.
MAX_WATERMARK: Final = 2**53 - 1


def json_field(payload: bytes, name: str) -> object:
    """Field `name` of a JSON object payload; None for anything else (not JSON,
    not an object, nested too deep)."""
    try:
        return json.loads(payload).get(name)
    except (ValueError, AttributeError, RecursionError):  # RecursionError: [[[[...
        return None


def watermark(payload: bytes) -> int | None:
    """The collector's `{root}/ack` watermark (ack.schema.json: `seq`, 0 to
    2^53 - 1), or None when the payload is not one."""
    seq = json_field(payload, "seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_WATERMARK:
        return None
    return seq


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """A control-socket request (status, operator login or logout) for the main loop."""

    reply: SimpleQueue[dict[str, Any]]
    request: dict[str, Any] = field(default_factory=lambda: {"cmd": "status"})


class Commands:
    """Carries out commands; owns the doctor list's snapshot that terminal
    workers read from their own threads (replaced, never mutated)."""

    def __init__(self, *, desks: list[str], operators: Operators, clock: Clock,
                 doctors: DoctorList, devices: Callable[[], Iterable[Device]],
                 status: Callable[[], dict[str, Any]]) -> None:
        self._desks = desks
        self._operators = operators
        self._clock = clock
        self._doctors = doctors
        self._devices = devices
        self._status = status
        self.doctors_now: Doctors | None = doctors.current()
        self.refused: dict[str, int] = {}  # see the module docstring

    def count_refused(self, what: str) -> None:
        self.refused[what] = self.refused.get(what, 0) + 1

    def mqtt(self, name: str, payload: bytes) -> dict[str, Any]:
        """Carry out command `name`; the result object to publish."""
        request_id: str | None = None
        error: str | None = None
        try:
            body = json.loads(payload) if len(payload) <= MAX_COMMAND_BYTES else None
        except (ValueError, RecursionError):  # RecursionError: [[[[... nested too deep
            body = None
        if not isinstance(body, dict):
            error = "payload must be a JSON object of at most 64 KiB"
        else:
            rid = body.get("request_id")
            request_id = rid if isinstance(rid, str) and len(rid) <= 128 else None
            if request_id is None:
                error = "request_id must be a string of at most 128 characters"
            elif name == "doctors":
                error = self._doctors_cmd(body)
            elif name == "operator":
                error = self._login(body)
            elif name != "ping":
                error = f"unknown command {name!r}; known: doctors, operator, ping"
        if error is not None:
            self.count_refused(name if name in COMMANDS else "unknown")
        return {"request_id": request_id, "ok": error is None, "error": error}

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer a control-socket request."""
        if request.get("cmd") != "operator":
            return self._status()
        if request.get("logout") is True:
            error = self._logout(request.get("desk"))
        else:
            error = self._login(request)
        reply: dict[str, Any] = {"ok": error is None, "error": error}
        if error is not None:
            self.count_refused("control")
        if error is None and self._operators.unsaved:
            reply["warning"] = ("applied, but logins.json could not be written (is the disk "
                                "full or read-only?); it holds until the daemon restarts")
        return reply

    def _desk_error(self, desk: object) -> str | None:
        if not isinstance(desk, str) or desk not in self._desks:
            return f"desk must be one of {', '.join(self._desks)}"
        return None

    def _login(self, body: dict[str, Any]) -> str | None:
        desk, op = body.get("desk"), body.get("operator", ...)
        error = self._desk_error(desk)
        if error is not None:
            return error
        if op is ... or not (op is None or valid_operator(op)):
            # The refused value is not echoed: it may hold anything.
            return f"operator must be {OPERATOR_RULE}; or null for nobody"
        self._operators.login(str(desk), op, "command", self._clock.wall_ns())
        log.info("desk %s: operator %s on duty by command", printable(desk),
                 printable(op or "nobody"))
        return None

    def _logout(self, desk: object) -> str | None:
        """End the desk's login: back to the roster or the config's operator."""
        error = self._desk_error(desk)
        if error is not None:
            return error
        ended = self._operators.logout(str(desk), self._clock.wall_ns())
        log.info("desk %s: %s logged out", printable(desk),
                 printable((ended.operator if ended else None) or "nobody"))
        return None

    def _doctors_cmd(self, body: dict[str, Any]) -> str | None:
        try:
            rev, doctors = validate_doctors(body)
        except ValueError as e:
            return str(e)
        current = self.doctors_now
        if current is not None and rev <= current[0]:
            return f"rev {rev} is not newer than the current rev {current[0]}"
        self._doctors.update(rev, doctors)
        self.doctors_now = (rev, doctors)
        log.info("doctor list rev %d (%d doctors) from the doctors command", rev, len(doctors))
        for dev in self._devices():
            dev.on_doctors((rev, doctors))
        return None
