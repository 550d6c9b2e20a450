"""Small documents that change rarely, kept in TinyDB with crash-safe writes.

TinyDB's default JSONStorage truncates the file and writes it again in place,
so a power cut in the middle leaves an empty or half-written file.  Here every
write goes to a temporary file that is fsync'ed and then renamed over the old
one (and the directory fsync'ed), so the file is always either the old or the
new document.  That costs a whole-file rewrite per change, which is why only
small, rarely changing state lives here; the event outbox is SQLite.

Faults: a file that is there but unreadable (zero-length, truncated, not
JSON) is moved aside as `<name>.corrupt` and read as empty, and the storage
remembers why (`damaged`) so its owner can raise `state_unreadable`.  A write
that fails (full, read-only, I/O error, the temporary file cannot be
created) raises OSError with the old file intact; owners keep the change in
memory and raise `state_write_failed` (edge/operators.py, edge/doctors.py) or
refuse the commit that needed it (the seq reservation, edge/outbox_file.py).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinydb import TinyDB
from tinydb.storages import Storage

__all__ = ["AtomicJSONStorage", "FaultReport", "StateFile", "ignore_faults", "open_state",
           "write_atomic"]


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file.

    Run as root (an admin's `sudo feedback-edge operator add`), the file goes
    to the owner of its directory, the service user in the state directory:
    a root-owned 0600 file there would be unreadable to the daemon."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if os.geteuid() == 0:
            st = os.stat(path.parent)
            os.fchown(fd, st.st_uid, st.st_gid)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AtomicJSONStorage(Storage):
    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        # Why the file could not be read (it was moved aside), or None.
        self.damaged: str | None = None

    def read(self) -> dict[str, dict[str, Any]] | None:
        self.damaged = None
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            # Unreadable in place (EIO, EACCES): start empty, leave the file be.
            self.damaged = f"cannot be read: {e.strerror}"
            return None
        data: object = None
        if raw.strip():
            with contextlib.suppress(ValueError):
                data = json.loads(raw)
        if isinstance(data, dict):
            return data
        # Only a file damaged outside our control gets here (the rename is
        # atomic); keep it for inspection and start empty rather than refuse
        # to run at a clinic.
        self.damaged = "zero-length" if not raw else "not a JSON document"
        with contextlib.suppress(OSError):
            os.replace(self._path, self._path.with_name(self._path.name + ".corrupt"))
        return None

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        write_atomic(self._path, json.dumps(data, sort_keys=True).encode())

    def close(self) -> None:
        pass


def open_state(path: Path) -> TinyDB:
    """A TinyDB on `path` with AtomicJSONStorage.  A directory that cannot be
    created is left to the first write, which then raises OSError."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
    return TinyDB(path, storage=AtomicJSONStorage)


# (alarm code, file name, sentence; None clears it): how owners of state
# files report their faults to the daemon's alarms.
FaultReport = Callable[[str, str, str | None], None]


def ignore_faults(code: str, subject: str, text: str | None) -> None:
    """A FaultReport for tools that run without alarms (the CLI)."""
    del code, subject, text


class StateFile:
    """One small state file: its TinyDB, and whether it was found damaged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = open_state(path)
        storage = self.db.storage
        # Reading happens lazily in TinyDB: read once now to know.
        self.db.tables()
        self.damaged: str | None = storage.damaged if isinstance(storage, AtomicJSONStorage) \
            else None

    def replace(self, doc: dict[str, Any]) -> None:
        """Make `doc` the file's one document.  Raises OSError (the file unchanged)."""
        if self.db.get(doc_id=1) is None:
            self.db.insert(doc)
        else:
            self.db.update(doc, doc_ids=[1])

    def close(self) -> None:
        self.db.close()
