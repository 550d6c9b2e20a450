"""Small documents that change rarely, kept in TinyDB with crash-safe writes.

TinyDB's default JSONStorage truncates the file and writes it again in place,
so a power cut in the middle leaves an empty or half-written file.  Here every
write goes to a temporary file that is fsync'ed and then renamed over the old
one (and the directory fsync'ed), so the file is always either the old or the
new document.  That costs a whole-file rewrite per change, which is why only
small, rarely changing state lives here; the event outbox is SQLite.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tinydb import TinyDB
from tinydb.storages import Storage

__all__ = ["AtomicJSONStorage", "open_state", "write_atomic"]


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
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

    def read(self) -> dict[str, dict[str, Any]] | None:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return None
        if not raw.strip():
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            # Only a file damaged outside our control gets here (the rename is
            # atomic); keep it for inspection and start empty rather than refuse
            # to run at a clinic.
            os.replace(self._path, self._path.with_name(self._path.name + ".corrupt"))
            return None
        return data if isinstance(data, dict) else None

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        write_atomic(self._path, json.dumps(data, sort_keys=True).encode())

    def close(self) -> None:
        pass


def open_state(path: Path) -> TinyDB:
    path.parent.mkdir(parents=True, exist_ok=True)
    return TinyDB(path, storage=AtomicJSONStorage)
