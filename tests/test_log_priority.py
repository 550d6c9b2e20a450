"""The daemon's log lines carry journald's priority prefix only when stderr is
the journal (JOURNAL_STREAM names stderr's device and inode, as systemd sets
it): under the unit, `journalctl -p warning` then finds the warnings, which
it did not while every line was logged at the stream's default priority."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EMIT = ("import logging; from edge.logsafe import log_handler; "
        "logging.basicConfig(level=logging.INFO, handlers=[log_handler()]); "
        "log = logging.getLogger('edge.daemon'); log.info('started'); "
        "log.warning('alarm device_missing raised'); log.error('two\\nlines')")


def _run(tmp_path: Path, journal: bool) -> str:
    out = tmp_path / "stderr"
    with out.open("wb") as f:
        st = os.fstat(f.fileno())
        env = {**os.environ}
        env.pop("JOURNAL_STREAM", None)
        if journal:
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", EMIT], stderr=f, env=env, check=True,
                       cwd=Path(__file__).parents[1])
    return out.read_text()


def test_lines_to_the_journal_carry_their_priority(tmp_path: Path) -> None:
    assert _run(tmp_path, journal=True).splitlines() == [
        "<6>INFO edge.daemon: started",
        "<4>WARNING edge.daemon: alarm device_missing raised",
        "<3>ERROR edge.daemon: two",
        "<3>lines"]


def test_lines_elsewhere_are_plain(tmp_path: Path) -> None:
    assert _run(tmp_path, journal=False).splitlines() == [
        "INFO edge.daemon: started", "WARNING edge.daemon: alarm device_missing raised",
        "ERROR edge.daemon: two", "lines"]
