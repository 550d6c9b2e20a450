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

from drivers.terminal import MAX_PAYLOAD
from edge.contract.ids import DOCTOR_ID_RE
from edge.state import FaultReport, StateFile, ignore_faults

__all__ = ["DoctorList", "validate_doctors"]

log = logging.getLogger(__name__)

_SHA256: Final = re.compile(r"^[0-9a-f]{64}\Z")
# Names and specialties are shown on the terminals' screen and the status page:
# any text, but no control or line-breaking characters, and no unpaired
# surrogate (UTF-8 cannot encode one for the terminals' DOCTORS frame).
_UNPRINTABLE: Final = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
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
        if not isinstance(did, str) or not DOCTOR_ID_RE.match(did) or did in seen:
            raise ValueError(f"doctors[{i}].id must be a unique id of 1-64 letters, digits, "
                             "'_', '.', '-'")
        if not isinstance(name, str) or not 1 <= len(name) <= 128 or _UNPRINTABLE.search(name):
            raise ValueError(f"doctors[{i}].name must be a string of 1-128 characters, "
                             "without control characters or line breaks")
        if not isinstance(spec, str) or len(spec) > 128 or _UNPRINTABLE.search(spec):
            raise ValueError(f"doctors[{i}].specialty must be a string of at most 128 "
                             "characters, without control characters or line breaks")
        if photo is not None and (not isinstance(photo, str) or not _SHA256.match(photo)):
            raise ValueError(f"doctors[{i}].photo must be null or a lower-case sha256 hex")
        seen.add(did)
        out.append({"id": did, "name": name, "specialty": spec, "photo": photo})
    # It goes to the terminals as one DOCTORS frame, as compact UTF-8 JSON.
    size = len(json.dumps({"rev": rev, "doctors": out}, separators=(",", ":"),
                          ensure_ascii=False).encode())
    if size > MAX_PAYLOAD:
        raise ValueError(f"doctors take {size} bytes as the terminals' DOCTORS frame; "
                         f"a frame holds at most {MAX_PAYLOAD}: shorten names or specialties")
    return rev, out


class DoctorList:
    """The newest doctor list, kept in `state_path` (TinyDB, atomic writes).

    A list that cannot be written (full or read-only disk) is kept in memory
    and in use, reported as `state_write_failed`, and written again by
    `retry()`; an unreadable file is reported as `state_unreadable`.
    """

    def __init__(self, state_path: Path, file: Path | None = None,
                 on_fault: FaultReport = ignore_faults) -> None:
        self._file = StateFile(state_path)
        self._on_fault = on_fault
        self._unsaved: tuple[int, list[dict[str, Any]]] | None = None
        self._bad_reported = False
        if self._file.damaged:
            on_fault("state_unreadable", state_path.name, f"{state_path.name} was unreadable "
                     f"({self._file.damaged}); the doctor list starts from doctors_file")
        if file is not None:
            self._load_file(file)

    def _load_file(self, file: Path) -> None:
        try:
            rev, doctors = validate_doctors(json.loads(file.read_text(encoding="utf-8")))
        except (OSError, ValueError, AttributeError) as e:
            self._on_fault("doctors_file", file.name, f"{file} is not usable: {e}")
            log.error("doctors_file: %s is not usable: %s", file, e)
            return
        current = self.current()
        if current is None or rev > current[0]:
            self.update(rev, doctors)

    def current(self) -> tuple[int, list[dict[str, Any]]] | None:
        if self._unsaved is not None:
            return self._unsaved
        doc = self._file.db.get(doc_id=1)
        if not isinstance(doc, dict):
            return None
        try:
            return validate_doctors(dict(doc))
        except (ValueError, TypeError, AttributeError):
            # JSON, but not a doctor list: as if there were none (doctors_file or the
            # command bring one), reported once.
            if not self._bad_reported:
                self._bad_reported = True
                name = self._file.path.name
                self._on_fault("state_unreadable", name, f"{name} holds no valid doctor list")
            return None

    def update(self, rev: int, doctors: list[dict[str, Any]]) -> None:
        self._unsaved = (rev, doctors)
        self.retry()

    def retry(self) -> None:
        """Write a list that could not be written before."""
        if self._unsaved is None:
            return
        rev, doctors = self._unsaved
        name = self._file.path.name
        try:
            self._file.replace({"rev": rev, "doctors": doctors})
        except OSError as e:
            self._on_fault("state_write_failed", name, f"{name} could not be written "
                           f"({e.strerror}); doctor list rev {rev} is in use but not saved")
            return
        self._unsaved = None
        self._on_fault("state_write_failed", name, None)

    def close(self) -> None:
        self._file.close()
