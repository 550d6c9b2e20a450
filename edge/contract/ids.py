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

__all__ = ["DESK_RE", "DEVICE_SERIAL_RE", "DOCTOR_ID_RE", "LANG_RE", "NAME_RE", "OPERATOR_RE",
           "OPERATOR_RULE", "SCORE_RANGE", "SERIAL_RE", "valid_operator"]

# site, edge and device ids: they are topic levels, so no '/', '+', '#'.
NAME_RE: Final = re.compile(r"^[a-z0-9-]{1,32}\Z")
# The 12 upper-case hex digits printed on a console's or terminal's label.
SERIAL_RE: Final = re.compile(r"^[0-9A-F]{12}\Z")
# A serial number a device states about itself (a terminal's HELLO): it
# names the device in status, events and dedup keys.
DEVICE_SERIAL_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,32}\Z")
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
