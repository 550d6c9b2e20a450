"""The kernel's clock verdict when a sandbox refuses the call that reads it.

A seccomp filter (tests/fixtures/deny_clock_syscalls.c, the kernel's own, as
systemd installs one for SystemCallFilter=) refuses adjtimex and
clock_adjtime with EPERM.  The daemon took the refused call's untouched,
zeroed status for "synchronised" (found under a real systemd, whose filter
did that until the unit allowed the calls again)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).parent / "fixtures" / "deny_clock_syscalls.c"
ASK = "from edge.clock import kernel_clock_synced; print(kernel_clock_synced())"


@pytest.fixture
def deny_clock(tmp_path: Path) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler for the seccomp wrapper")
    out = tmp_path / "deny_clock_syscalls"
    subprocess.run([cc, "-O2", "-o", str(out), str(SOURCE)], check=True)
    return out


def test_a_refused_clock_call_reads_as_not_synchronised(deny_clock: Path) -> None:
    proc = subprocess.run([str(deny_clock), sys.executable, "-c", ASK],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False", proc.stdout + proc.stderr
    # The same question without the filter reaches the kernel: whatever its
    # answer on this machine, the call itself went through.
    probe = "import ctypes, ctypes.util; from edge.clock import _Timex; " \
            "libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True); " \
            "print(libc.adjtimex(ctypes.byref(_Timex())))"
    free = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    denied = subprocess.run([str(deny_clock), sys.executable, "-c", probe],
                            capture_output=True, text=True, check=True)
    assert int(free.stdout) >= 0
    assert int(denied.stdout) == -1
