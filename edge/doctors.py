"""The doctor list shown on the survey terminals' first screen.

It comes from a local JSON file (`[survey] doctors_file`) and from the
`doctors` MQTT command; the newest revision wins and is kept across restarts
in a small TinyDB document next to the store (it changes a few times a year).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Final

from edge.state import open_state

__all__ = ["DoctorList", "validate_doctors"]

log = logging.getLogger(__name__)

_ID: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SHA256: Final = re.compile(r"^[0-9a-f]{64}$")
MAX_DOCTORS: Final = 200


def validate_doctors(body: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    """(rev, doctors) from a command or file body; ValueError says what is wrong."""
    rev = body.get("rev")
    if isinstance(rev, bool) or not isinstance(rev, int) or not 0 <= rev < 2**31:
        raise ValueError("rev must be an integer from 0 to 2^31-1")
    doctors = body.get("doctors")
    if not isinstance(doctors, list) or len(doctors) > MAX_DOCTORS:
        raise ValueError(f"doctors must be a list of at most {MAX_DOCTORS} entries")
    out = []
    seen: set[str] = set()
    for i, d in enumerate(doctors):
        if not isinstance(d, dict):
            raise ValueError(f"doctors[{i}] must be an object")  # noqa: TRY004 - one error type for all bad input
        did, name, spec, photo = d.get("id"), d.get("name"), d.get("specialty"), d.get("photo")
        if not isinstance(did, str) or not _ID.match(did) or did in seen:
            raise ValueError(f"doctors[{i}].id must be a unique id of 1-64 letters, digits, "
                             "'_', '.', '-'")
        if not isinstance(name, str) or not 1 <= len(name) <= 128:
            raise ValueError(f"doctors[{i}].name must be a string of 1-128 characters")
        if not isinstance(spec, str) or len(spec) > 128:
            raise ValueError(f"doctors[{i}].specialty must be a string of at most 128 characters")
        if photo is not None and (not isinstance(photo, str) or not _SHA256.match(photo)):
            raise ValueError(f"doctors[{i}].photo must be null or a lower-case sha256 hex")
        seen.add(did)
        out.append({"id": did, "name": name, "specialty": spec, "photo": photo})
    return rev, out


class DoctorList:
    def __init__(self, state_path: Path, file: Path | None = None) -> None:
        self._db = open_state(state_path)
        self.alarms: list[str] = []
        if file is not None:
            self._load_file(file)

    def _load_file(self, file: Path) -> None:
        try:
            rev, doctors = validate_doctors(json.loads(file.read_text(encoding="utf-8")))
        except (OSError, ValueError, AttributeError) as e:
            alarm = f"doctors_file: {file} is not usable: {e}"
            self.alarms.append(alarm)
            log.error("%s", alarm)
            return
        current = self.current()
        if current is None or rev > current[0]:
            self.update(rev, doctors)

    def current(self) -> tuple[int, list[dict[str, Any]]] | None:
        doc = self._db.get(doc_id=1)
        if doc is None:
            return None
        return int(doc["rev"]), list(doc["doctors"])

    def update(self, rev: int, doctors: list[dict[str, Any]]) -> None:
        if self._db.get(doc_id=1) is None:
            self._db.insert({"rev": rev, "doctors": doctors})
        else:
            self._db.update({"rev": rev, "doctors": doctors}, doc_ids=[1])

    def close(self) -> None:
        self._db.close()
