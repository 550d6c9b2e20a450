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
"""

from __future__ import annotations

import unicodedata
from typing import Final

__all__ = ["printable"]

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
