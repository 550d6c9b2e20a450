"""Keyboard-class buttons and badge readers (HID boot keyboard): protocol core.

Pure code: boot keyboard reports in, key presses, button presses and badge
scans out.  Spec: shared/devices/keyboard-class.md.  Matched on the USB bus by
class, not by VID:PID (`USB_MATCHER`: an interface 3/1/1, HID boot keyboard);
read through `drivers.hidraw_transport.HidrawKeyboard`.

Boot keyboard input report (8 bytes, no report ID)::

     0          1          2..7
    +----------+----------+-----------------------------------+
    | modifiers| reserved | up to six key usages held now     |
    +----------+----------+-----------------------------------+
    usages (HID page 0x07): 04..1D 'a'..'z', 1E..27 '1'..'9','0', 28 Enter,
    59..62 keypad '1'..'9','0'; six 01 bytes = rollover error (ignored)

A key is pressed when its usage appears in a report and was not in the
previous one; releases are not events.  Decode errors, counted by name:
`bad_length`, `rollover` (the six-01 report, ignored as the sheet says).

Where the sheet is silent, our choices:
- A report after a rollover report is compared with the last *good* report,
  so keys held through the rollover do not fire twice.
- Badge characters are the letters and digits above (modifiers ignored:
  readers type upper-case letters with Shift, and badge ids are compared
  case-insensitively, stored upper-case).
- A scan that reaches Enter with fewer than 4 or more than 32 characters is
  counted as `bad_scan` and discarded; a gap of more than 100 ms before Enter
  is counted as `partial_scan`, and the late key starts a new scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from drivers.usb_match import Matcher

__all__ = [
    "USB_MATCHER",
    "BadgeDecoder",
    "BadgeScan",
    "BootDecoder",
    "ButtonMap",
    "ButtonPress",
    "KeyPress",
    "usage_char",
]

# HID class 3, boot subclass 1, keyboard protocol 1: buttons, badge readers.
USB_MATCHER: Final = Matcher("keyboard", interface=(3, 1, 1))
REPORT_LEN: Final = 8
ENTER: Final = 0x28
ROLLOVER: Final = bytes([1] * 6)
SCAN_GAP_MS: Final = 100
SCAN_MIN: Final = 4
SCAN_MAX: Final = 32


def usage_char(usage: int) -> str | None:
    """The character a usage types on a badge reader, if it is one."""
    if 0x04 <= usage <= 0x1D:
        return chr(ord("A") + usage - 0x04)
    if 0x1E <= usage <= 0x26:
        return chr(ord("1") + usage - 0x1E)
    if usage == 0x27:
        return "0"
    if 0x59 <= usage <= 0x61:
        return chr(ord("1") + usage - 0x59)
    if usage == 0x62:
        return "0"
    return None


@dataclass(frozen=True, slots=True)
class KeyPress:
    usage: int
    at_ms: int


@dataclass(frozen=True, slots=True)
class ButtonPress:
    usage: int
    label: str
    score: int | None
    at_ms: int


@dataclass(frozen=True, slots=True)
class BadgeScan:
    badge: str = ""
    at_ms: int = 0

    def __repr__(self) -> str:
        # Badge numbers identify people: never in a log line by accident.
        return f"BadgeScan(<{len(self.badge)} chars>, at_ms={self.at_ms})"


class BootDecoder:
    """Boot keyboard reports in, newly pressed keys out."""

    def __init__(self) -> None:
        self._held: frozenset[int] = frozenset()
        self.errors: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1

    def feed(self, report: bytes, at_ms: int) -> list[KeyPress]:
        if len(report) != REPORT_LEN:
            self._count("bad_length")
            return []
        keys = report[2:8]
        if keys == ROLLOVER:
            self._count("rollover")
            return []
        now = [u for u in keys if u > 0x03]  # 00 none, 01..03 error codes
        held = frozenset(now)
        new = [KeyPress(u, at_ms) for u in dict.fromkeys(now) if u not in self._held]
        self._held = held
        return new


class ButtonMap:
    """Configured key usage -> (label, score); unmapped keys counted."""

    def __init__(self, keys: dict[int, tuple[str, int | None]]) -> None:
        self.keys = keys
        self.unmapped = 0

    def press(self, key: KeyPress) -> ButtonPress | None:
        hit = self.keys.get(key.usage)
        if hit is None:
            self.unmapped += 1
            return None
        return ButtonPress(key.usage, hit[0], hit[1], key.at_ms)


class BadgeDecoder:
    """Key presses in, complete badge scans out (100 ms between keys, Enter ends)."""

    def __init__(self) -> None:
        self._chars: list[str] = []
        self._last_ms: int | None = None
        self.errors: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1

    def expire(self, now_ms: int) -> None:
        """Call when no key came for a while: a scan left without Enter is partial."""
        if self._chars and self._last_ms is not None and now_ms - self._last_ms > SCAN_GAP_MS:
            self._count("partial_scan")
            self._chars = []

    def feed(self, key: KeyPress) -> BadgeScan | None:
        self.expire(key.at_ms)
        self._last_ms = key.at_ms
        if key.usage == ENTER:
            chars, self._chars = self._chars, []
            if not chars:
                return None
            if not SCAN_MIN <= len(chars) <= SCAN_MAX:
                self._count("bad_scan")
                return None
            return BadgeScan("".join(chars), key.at_ms)
        ch = usage_char(key.usage)
        if ch is None:
            self._count("not_a_badge_key")
            return None
        self._chars.append(ch)
        return None
