"""Conditions a person must act on, each with a stable code.

An alarm is raised with a code (e.g. `disk_full`), a subject (which file,
device or desk it is about; "" for the edge as a whole), one plain sentence
and the time it was raised; it is cleared by code (and subject) when the
condition is over, or expires by itself when raised with `for_s` (news such
as a device's lost events).  Raising an active alarm again keeps its since
time.  Texts never contain personal data.

`texts()` gives the form health and status carry: "code: sentence".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Alarm", "Alarms"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Alarm:
    code: str
    subject: str
    text: str
    since_ns: int  # UTC ns when raised
    until_ns: int | None = None  # expires by itself then (UTC ns), or None


class Alarms:
    """The daemon's active alarms.  Owned by the main loop; `now_ns` is wall time."""

    def __init__(self) -> None:
        self._active: dict[tuple[str, str], Alarm] = {}

    def raise_(self, code: str, text: str, now_ns: int, *, subject: str = "",
               for_s: float | None = None) -> None:
        """Raise (or refresh the text and expiry of) alarm `code` about `subject`."""
        key = (code, subject)
        old = self._active.get(key)
        until = None if for_s is None else now_ns + int(for_s * 1e9)
        if old is None:
            log.warning("alarm %s raised: %s", code, text)
        self._active[key] = Alarm(code, subject, text, old.since_ns if old else now_ns, until)

    def clear(self, code: str, subject: str | None = None) -> bool:
        """Clear alarm `code` (about `subject`, or about anything); True if one was active."""
        keys = [k for k in self._active if k[0] == code and (subject is None or k[1] == subject)]
        for k in keys:
            log.info("alarm %s cleared", code)
            del self._active[k]
        return bool(keys)

    def active(self, now_ns: int) -> list[Alarm]:
        """The alarms in force at `now_ns`, oldest first (expired ones are dropped)."""
        for k in [k for k, a in self._active.items()
                  if a.until_ns is not None and a.until_ns <= now_ns]:
            del self._active[k]
        return sorted(self._active.values(), key=lambda a: a.since_ns)

    def report(self, wall_ns: Callable[[], int], code: str, subject: str,
               text: str | None) -> None:
        """Raise (text) or clear (None) alarm `code` about `subject`: the form
        edge.state.FaultReport takes, with the clock bound first."""
        if text is None:
            self.clear(code, subject)
        else:
            self.raise_(code, text, wall_ns(), subject=subject)

    def has(self, code: str) -> bool:
        return any(k[0] == code for k in self._active)

    def texts(self, now_ns: int) -> list[str]:
        return [f"{a.code}: {a.text}" for a in self.active(now_ns)]
