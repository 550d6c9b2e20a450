"""FunctionFS wire formats: what a userspace USB function writes to and reads
from its ep0 file.  Pure code, no I/O.

Sources: linux/usb/functionfs.h (the descriptor, string and event formats),
linux/usb/ch9.h (standard descriptors and requests), and the HID 1.11
specification (the HID class descriptor and class requests).  Everything is
little-endian.

Descriptors, written once to ep0 before the gadget is bound
(FUNCTIONFS_DESCRIPTORS_MAGIC_V2)::

     0        4        8        12         16         20
    +--------+--------+--------+----------+----------+----------------------+
    | magic 3| length | flags  | fs_count | hs_count | fs descs | hs descs  |
    +--------+--------+--------+----------+----------+----------------------+
    flags: 1 HAS_FS_DESC | 2 HAS_HS_DESC (each count present only with its flag)
    a descriptor is bLength, bDescriptorType, payload (USB 2.0 ch. 9.6)

Strings, written right after (FUNCTIONFS_STRINGS_MAGIC)::

     0        4        8           12           16
    +--------+--------+-----------+------------+---------------------------------+
    | magic 2| length | str_count | lang_count | per language: lang u16, then    |
    |        |        |           |            | str_count NUL-terminated UTF-8  |
    +--------+--------+-----------+------------+---------------------------------+
    string index 1 is the first string (0 means "no string")

Events, read from ep0 in 12-byte units (struct usb_functionfs_event)::

     0              1         2..3    4..5    6..7     8      9..11
    +--------------+---------+-------+-------+--------+------+-----+
    | bRequestType | bRequest| wValue| wIndex| wLength| type | pad |
    +--------------+---------+-------+-------+--------+------+-----+
    type 0 BIND, 1 UNBIND, 2 ENABLE, 3 DISABLE, 4 SETUP, 5 SUSPEND, 6 RESUME;
    the first 8 bytes (usb_ctrlrequest) mean something for SETUP only, and
    for a request to an interface wIndex is the function's own interface number

After a SETUP the next ep0 I/O is its data stage: for a device-to-host
request (bRequestType bit 7) write the answer, or read 0 bytes to stall;
for host-to-device, read wLength bytes (0 to only acknowledge), or write
0 bytes to stall.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

__all__ = [
    "EVENT_SIZE",
    "Event",
    "EventType",
    "Setup",
    "descriptors",
    "endpoint",
    "hid_descriptor",
    "interface",
    "parse_events",
    "strings",
]

DESCRIPTORS_MAGIC_V2: Final = 3
STRINGS_MAGIC: Final = 2
HAS_FS_DESC: Final = 1
HAS_HS_DESC: Final = 2

DT_INTERFACE: Final = 0x04
DT_ENDPOINT: Final = 0x05
DT_HID: Final = 0x21
DT_REPORT: Final = 0x22

DIR_IN: Final = 0x80
TYPE_MASK: Final = 0x60
TYPE_STANDARD: Final = 0x00
TYPE_CLASS: Final = 0x20
RECIP_MASK: Final = 0x1F
RECIP_INTERFACE: Final = 0x01
RECIP_ENDPOINT: Final = 0x02

REQ_GET_STATUS: Final = 0x00
REQ_CLEAR_FEATURE: Final = 0x01
REQ_GET_DESCRIPTOR: Final = 0x06

XFER_INTERRUPT: Final = 0x03

EVENT_SIZE: Final = 12
_EVENT = struct.Struct("<BBHHHB3x")
_HEAD = struct.Struct("<III")


class EventType(IntEnum):
    """enum usb_functionfs_event_type (linux/usb/functionfs.h)."""

    BIND = 0
    UNBIND = 1
    ENABLE = 2
    DISABLE = 3
    SETUP = 4
    SUSPEND = 5
    RESUME = 6


@dataclass(frozen=True, slots=True)
class Setup:
    """A control request (struct usb_ctrlrequest, USB 2.0 table 9-2)."""

    request_type: int
    request: int
    value: int
    index: int
    length: int

    @property
    def device_to_host(self) -> bool:
        return bool(self.request_type & DIR_IN)


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType | int
    setup: Setup | None  # only for SETUP


def parse_events(data: bytes) -> list[Event]:
    """Events from one ep0 read (a multiple of EVENT_SIZE bytes; a short tail
    is ignored).  An event type this module does not know stays an int."""
    events: list[Event] = []
    for off in range(0, len(data) - EVENT_SIZE + 1, EVENT_SIZE):
        rtype, req, value, index, length, etype = _EVENT.unpack_from(data, off)
        try:
            kind: EventType | int = EventType(etype)
        except ValueError:
            kind = etype
        setup = Setup(rtype, req, value, index, length) if kind == EventType.SETUP else None
        events.append(Event(kind, setup))
    return events


def interface(number: int, endpoints: int, *, cls: int, subclass: int, protocol: int,
              string: int = 0) -> bytes:
    """An interface descriptor (9 bytes, USB 2.0 table 9-12)."""
    return struct.pack("<BBBBBBBBB", 9, DT_INTERFACE, number, 0, endpoints, cls, subclass,
                       protocol, string)


def hid_descriptor(report_descriptor_len: int, bcd_hid: int = 0x0111) -> bytes:
    """The HID class descriptor (9 bytes, HID 1.11 section 6.2.1): one report
    descriptor of the given length, no country code."""
    return struct.pack("<BBHBBBH", 9, DT_HID, bcd_hid, 0, 1, DT_REPORT, report_descriptor_len)


def endpoint(address: int, attributes: int, max_packet: int, interval: int) -> bytes:
    """An endpoint descriptor (7 bytes, USB 2.0 table 9-13).  FunctionFS
    numbers a function's endpoints itself: address n is the file `ep<n>`,
    bit 7 set for IN.  `interval` is in frames (ms) at full speed and an
    exponent (2^(interval-1) microframes of 125 us) at high speed."""
    return struct.pack("<BBBBHB", 7, DT_ENDPOINT, address, attributes, max_packet, interval)


def descriptors(fs: list[bytes], hs: list[bytes]) -> bytes:
    """The ep0 descriptors block for full and high speed (magic V2)."""
    body = struct.pack("<II", len(fs), len(hs)) + b"".join(fs) + b"".join(hs)
    return _HEAD.pack(DESCRIPTORS_MAGIC_V2, _HEAD.size + len(body),
                      HAS_FS_DESC | HAS_HS_DESC) + body


def strings(table: dict[int, list[str]]) -> bytes:
    """The ep0 strings block: language id (0x0409 US English) -> strings,
    every language with the same number of strings."""
    counts = {len(s) for s in table.values()}
    if len(counts) > 1:
        raise ValueError("every language needs the same number of strings")
    count = counts.pop() if counts else 0
    body = b"".join(struct.pack("<H", lang) + b"".join(s.encode() + b"\0" for s in texts)
                    for lang, texts in table.items())
    return struct.pack("<IIII", STRINGS_MAGIC, 16 + len(body), count, len(table)) + body
