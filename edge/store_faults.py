"""The store's fault vocabulary: which fault an error is, and the alarm it raises.

`StoreError` and its subclasses are the faults of the store's files (busy,
full, read-only, I/O error, corrupt); each carries the `code` and `sentence`
of the alarm the Store raises for it (`edge.store`).  `classify` turns an
sqlite3 or OS error into one of them, by SQLite result code or errno, and
`refine` corrects that from what the file system says (free space, mounted
read-only).  What happens for each fault, file by file, is the fault table
in `edge.outbox_file`.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path
from typing import Final

__all__ = [
    "StoreBusyError",
    "StoreCorruptError",
    "StoreDiskFullError",
    "StoreError",
    "StoreIOError",
    "StoreReadOnlyError",
    "classify",
    "read_only_fs",
    "refine",
]

_NEARLY_FULL: Final = 64 * 1024  # bytes free below which an open/I/O error means full


class StoreError(Exception):
    """The store could not do what was asked; nothing was changed."""

    code = "store_error"
    sentence = "the event store failed"


class StoreBusyError(StoreError):
    """Another process holds the store's lock (SQLITE_BUSY, SQLITE_LOCKED)."""

    code = "store_busy"
    sentence = "another process holds the event store's lock; presses wait on the devices"


class StoreDiskFullError(StoreError):
    """The file system (or the store's page quota) is full."""

    code = "disk_full"
    sentence = "the disk is full; presses wait on the devices until there is room"


class StoreReadOnlyError(StoreError):
    """A store file cannot be written (read-only file system, permissions)."""

    code = "store_read_only"
    sentence = "the event store cannot be written (read-only disk?); presses wait on the devices"


class StoreIOError(StoreError):
    """The disk reported an I/O error (a failing SD card)."""

    code = "store_io_error"
    sentence = "the disk reports I/O errors (failing SD card?); presses wait on the devices"


class StoreCorruptError(StoreError):
    """The database failed its integrity check: the only fault that moves it aside."""

    code = "store_corrupt"
    sentence = "the event store was damaged"


_SQLITE_CLASSES: Final = {
    sqlite3.SQLITE_BUSY: StoreBusyError, sqlite3.SQLITE_LOCKED: StoreBusyError,
    sqlite3.SQLITE_FULL: StoreDiskFullError, sqlite3.SQLITE_READONLY: StoreReadOnlyError,
    sqlite3.SQLITE_PERM: StoreReadOnlyError, sqlite3.SQLITE_CANTOPEN: StoreReadOnlyError,
    sqlite3.SQLITE_IOERR: StoreIOError, sqlite3.SQLITE_CORRUPT: StoreCorruptError,
    sqlite3.SQLITE_NOTADB: StoreCorruptError,
}
_ERRNO_CLASSES: Final = {
    errno.ENOSPC: StoreDiskFullError, errno.EDQUOT: StoreDiskFullError,
    errno.EROFS: StoreReadOnlyError, errno.EACCES: StoreReadOnlyError,
    errno.EPERM: StoreReadOnlyError, errno.ENOTDIR: StoreReadOnlyError,
    errno.EISDIR: StoreReadOnlyError, errno.EEXIST: StoreReadOnlyError, errno.EIO: StoreIOError,
}


def classify(e: BaseException, doing: str) -> StoreError:
    """The StoreError subclass for an sqlite3 or OS error met while `doing` something."""
    if isinstance(e, StoreError):
        return e
    cls: type[StoreError] = StoreError
    if isinstance(e, sqlite3.Error):
        code = getattr(e, "sqlite_errorcode", None)
        if code is not None:
            cls = _SQLITE_CLASSES.get(code & 0xFF, StoreError)
        elif "locked" in str(e):
            cls = StoreBusyError
        elif "full" in str(e):
            cls = StoreDiskFullError
    elif isinstance(e, OSError) and e.errno is not None:
        cls = _ERRNO_CLASSES.get(e.errno, StoreIOError)
    err = cls(f"{doing}: {e}")
    err.__cause__ = e
    return err


def read_only_fs(directory: Path) -> bool:
    """Whether `directory` is on a file system mounted read-only (False if unknown)."""
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def refine(err: StoreError, free: int | None, directory: Path) -> StoreError:
    """`err` as the file system shows it: `free` bytes are free (None: unknown) on
    the file system of `directory`, the store's."""
    if not isinstance(err, StoreDiskFullError | StoreBusyError) and free is not None \
            and free < _NEARLY_FULL:
        # SQLite reports a full disk met while making its -shm or -wal file
        # as an open or I/O error: the free space tells the truth.
        err = StoreDiskFullError(f"{err} ({free} bytes free)")
    elif isinstance(err, StoreIOError) and read_only_fs(directory):
        # A file system the kernel turned read-only (ext4 errors=remount-ro)
        # reaches SQLite as an I/O error.
        err = StoreReadOnlyError(f"{err} (the file system is read-only)")
    return err
