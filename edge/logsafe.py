"""Text from outside (an MQTT command, a device, a roster or state file) made
safe to put in a log line: one line, nothing the terminal or journal reader
would interpret.

`printable(text)` escapes like `repr` does, without the quotes: control
characters (C0, DEL, C1) become `\\n`, `\\r`, `\\t` or `\\xNN`; Unicode line
and paragraph separators and format characters (bidi overrides, zero-width
characters) become `\\uNNNN`; a backslash becomes `\\\\`, so an escape in the
log always means an escaped character and never one the sender typed.  It is
cut to `max_len` characters (marked with "...").  Letters of any script stay
as they are.

`log_handler()` is the daemon's stderr handler: "LEVEL logger: message", and
when stderr is the journal (systemd's JOURNAL_STREAM names its device and
inode) each line starts with the syslog priority `<N>` that journald reads
(sd-daemon(3)), so `journalctl -p warning` finds the warnings.
"""

from __future__ import annotations

import logging
import os
import sys
import unicodedata
from typing import Final

__all__ = ["log_handler", "printable"]

# RFC 5424 severities for Python's levels.
_PRIORITY: Final = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                    (logging.INFO, 6))


def _to_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


class _PriorityFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = next((p for level, p in _PRIORITY if record.levelno >= level), 7)
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).split("\n"))


def log_handler() -> logging.Handler:
    """A stderr handler, with journal priorities when stderr is the journal."""
    handler = logging.StreamHandler()
    fmt = "%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(_PriorityFormatter(fmt) if _to_journal() else logging.Formatter(fmt))
    return handler

_SHORT: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
_ESCAPED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _escape(ch: str) -> str:
    if ch in _SHORT:
        return _SHORT[ch]
    if unicodedata.category(ch) not in _ESCAPED_CATEGORIES:
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else \
        f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text: object, max_len: int = 200) -> str:
    """`text` (str() of anything else; None as "-") as one safe log line."""
    s = "-" if text is None else text if isinstance(text, str) else str(text)
    cut = len(s) > max_len
    out = "".join(_escape(c) for c in s[:max_len])
    return out + "..." if cut else out
