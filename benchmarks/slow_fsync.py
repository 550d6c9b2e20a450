"""A slow fsync for the slow-storage runs: an LD_PRELOAD shim, built with gcc.

An SD card takes milliseconds to tens of milliseconds per fsync where this
machine's page cache takes 0.2 ms (shared/measured.md).  The shim wraps
fsync and fdatasync (SQLite's and Python's alike) in the process it is
preloaded into:

- `SLOW_FSYNC_US=7000` adds that many microseconds to each call;
- `slow_fsync_gate(in_fd, out_fd)`, called through ctypes, makes each call
  write one byte to `out_fd` and then block until it reads one from `in_fd`
  (-1, -1 turns that off): tests hold an fsync for as long as they like and
  know when one started, without sleeping.

It runs wherever gcc does (CI included); a device-mapper delay target would
need root and a block device.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["SOURCE", "build_shim", "preload_env"]

SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static long delay_us = -1;
static volatile int gate_in = -1, gate_out = -1;

void slow_fsync_gate(int in_fd, int out_fd) { gate_in = in_fd; gate_out = out_fd; }

static void slow(void) {
    int in = gate_in, out = gate_out;
    if (delay_us < 0) {
        const char *e = getenv("SLOW_FSYNC_US");
        delay_us = e ? atol(e) : 0;
    }
    if (in >= 0 && out >= 0) {
        char c = 'f';
        if (write(out, &c, 1) == 1) { while (read(in, &c, 1) < 0) {} }
    }
    if (delay_us > 0) {
        struct timespec ts = {delay_us / 1000000, (delay_us % 1000000) * 1000};
        while (nanosleep(&ts, &ts) != 0) {}
    }
}

int fsync(int fd) {
    if (!real_fsync) real_fsync = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    slow();
    return real_fsync(fd);
}

int fdatasync(int fd) {
    if (!real_fdatasync) real_fdatasync = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    slow();
    return real_fdatasync(fd);
}
"""


def build_shim(work: Path) -> Path | None:
    """Compile the shim into `work`; None when there is no C compiler."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    src, lib = work / "slow_fsync.c", work / "slow_fsync.so"
    src.write_text(SOURCE)
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"],
                   check=True)
    return lib


def preload_env(lib: Path, delay_us: int = 0) -> dict[str, str]:
    """The environment of a child process that has the shim preloaded."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(p for p in (str(lib), env.get("LD_PRELOAD", "")) if p)
    env["SLOW_FSYNC_US"] = str(delay_us)
    return env
