"""Identifier grammars shared by the config, the commands, the device drivers
and the collector (../shared/mqtt-contract.md: site, edge and device ids
appear in topics).  One grammar per identifier; everything that takes such an
id from outside (config, MQTT command, control socket, roster file, device)
checks it against the grammar here, so no id can carry a line break, an
escape sequence or a topic wildcard into a log, a topic or a report.

Every pattern ends in `\\Z`, not `$`: with `re.match`, `$` also matches
before a trailing newline, so `^[a-z]+$` accepts "clinic\\n".
"""

from __future__ import annotations

import re
from typing import Final

# A press's score, as the event schema bounds it (edge/contract/schemas/event.schema.json).
SCORE_RANGE: Final = (-1000, 1000)

__all__ = ["BOOT_ID_RE", "DESK_RE", "DEVICE_SERIAL_RE", "DOCTOR_ID_RE", "LANG_RE", "NAME_RE",
           "OPERATOR_RE", "OPERATOR_RULE", "REASON_RE", "SCORE_RANGE", "SERIAL_RE",
           "USB_PORT_ID_RE", "USB_PORT_RE", "USB_SERIAL_RE", "VERSION_RE", "event_id_fault",
           "valid_operator"]

# site, edge and device ids: they are topic levels, so no '/', '+', '#'.
NAME_RE: Final = re.compile(r"^[a-z0-9-]{1,32}\Z")
# The 12 upper-case hex digits printed on a console's or terminal's label.
SERIAL_RE: Final = re.compile(r"^[0-9A-F]{12}\Z")
# A serial number a device states about itself (a terminal's HELLO): it
# names the device in status, events and dedup keys.
DEVICE_SERIAL_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,32}\Z")
# What an event's device.serial may hold: a USB iSerialNumber as udev shows it
# (keyboards, badge readers), which includes SERIAL_RE and DEVICE_SERIAL_RE.
USB_SERIAL_RE: Final = re.compile(r"^[ -~]{1,64}\Z")
# A USB port path as sysfs names it: bus, '-', ports joined by '.' ("1-1.2").
USB_PORT_RE: Final = re.compile(r"^[0-9]{1,3}-[0-9.]{1,27}\Z")
# The inventory's id of hardware plugged in but not configured: "usb-" and its port path.
USB_PORT_ID_RE: Final = re.compile(r"^usb-[0-9]{1,3}-[0-9.]{1,27}\Z")
# A name the daemon gives a reason or a counter (dropped.reason, health's drops
# and decode error names, event flags): store_full, after_hours, bad_length.
REASON_RE: Final = re.compile(r"^[a-z_]{1,32}\Z")
# The daemon's version in its status (PEP 440: 0.1.0, 0.1.0+g1a2b3c).
VERSION_RE: Final = re.compile(r"^[A-Za-z0-9_.+!-]{1,64}\Z")
# The kernel's boot_id is a UUID; other producers may name a boot otherwise.
BOOT_ID_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")
DESK_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
# Doctor ids: the doctor list's ids, and what terminals report.
DOCTOR_ID_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
# A terminal's UI language: a BCP 47-like tag ("en", "ru", "pt-BR").
LANG_RE: Final = re.compile(r"^[A-Za-z]{2,8}(?:-[A-Za-z0-9]{1,8}){0,3}\Z")

# Operator ids are what a clinic's HR uses: staff numbers ("op-17", "4711")
# or names ("Анна Петрова", "O'Brien", "José María").  So: 1 to 64 of letters
# and digits of any script (Python's \w, which includes '_'; plus combining
# accents U+0300-U+036F for decomposed text and the vowel signs of the Indic
# scripts U+0900-U+0DFF), space, '.', '-', and the apostrophes ' and U+2019;
# no space at either end.  Nothing else: no control or format characters (line
# breaks, escape sequences, bidi overrides), no '/', '+', '#', '=', '@'.
_OP_CHAR: Final = r"\w.'\u2019\u0300-\u036f\u0900-\u0dff-"
OPERATOR_RE: Final = re.compile(rf"^(?=.{{1,64}}\Z)[{_OP_CHAR}](?:[{_OP_CHAR} ]*[{_OP_CHAR}])?\Z",
                                re.DOTALL)
OPERATOR_RULE: Final = ("an operator id: 1 to 64 letters or digits (any script), spaces, '.', "
                        "'-', '_' or apostrophes, not starting or ending with a space")


def valid_operator(value: object) -> bool:
    """Whether `value` is an operator id (a str matching OPERATOR_RE)."""
    return isinstance(value, str) and OPERATOR_RE.match(value) is not None


def _match(pattern: re.Pattern[str], value: object) -> bool:
    return isinstance(value, str) and pattern.match(value) is not None


def event_id_fault(event: dict[str, object]) -> str | None:
    """The path of the first identifier in a schema-valid event (event.schema.json)
    that breaks its grammar here, or None.

    The schema's patterns say the same for the ASCII grammars; the operator id's
    (letters of any script) needs Unicode classes that ECMA-262 patterns without
    the `u` flag lack, so this is where a consumer enforces it exactly.
    """
    checks: list[tuple[str, object, re.Pattern[str]]] = [("desk", event.get("desk"), DESK_RE)]
    op = event.get("operator")
    if isinstance(op, dict) and op.get("id") is not None:
        checks.append(("operator/id", op.get("id"), OPERATOR_RE))
    dev = event.get("device")
    if isinstance(dev, dict) and dev.get("serial") is not None:
        checks.append(("device/serial", dev.get("serial"), USB_SERIAL_RE))
    t = event.get("time")
    if isinstance(t, dict):
        checks.append(("time/boot_id", t.get("boot_id"), BOOT_ID_RE))
    for kind in ("answer", "abandoned"):
        body = event.get(kind)
        if isinstance(body, dict):
            if body.get("doctor") is not None:
                checks.append((f"{kind}/doctor", body.get("doctor"), DOCTOR_ID_RE))
            if "lang" in body:
                checks.append((f"{kind}/lang", body.get("lang"), LANG_RE))
    for where, value, pattern in checks:
        if not _match(pattern, value):
            return where
    return None
