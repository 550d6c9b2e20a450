"""scripts/demo.py as a user runs it: a process of its own, its children real
processes, stopped by a signal as Ctrl-C stops it.  Each run has its own run
directory (--dir), so its children are found by their command lines."""

from __future__ import annotations

import importlib.util
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scripts" / "demo.py"
PHONE = "+4917012345"
CHILDREN = ("mosquitto", "firmware_sim", "edge.cli", "collector.cli")


def _cmdline(pid: str) -> str:
    try:
        return (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def processes_in(run_dir: Path) -> list[str]:
    """Live processes whose command line names the run directory (zombies have none)."""
    me = str(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != me:
            cmd = _cmdline(entry.name)
            if str(run_dir) in cmd:
                found.append(f"{entry.name}: {cmd}")
    return found


def blocked_signals(pid: int) -> int | None:
    """The process's blocked-signal mask (None: it has ended)."""
    try:
        status = (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    return None


class DemoProc:
    """`python scripts/demo.py` with its output read line by line as it comes."""

    def __init__(self, run_dir: Path, *args: str) -> None:
        self.run_dir = run_dir
        self.started = time.monotonic()
        env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}:/usr/sbin",
               "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, str(DEMO), "--dir", str(run_dir), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=ROOT, env=env, text=True)
        self.lines: list[str] = []
        self._q: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self._q.put(line)
        self._q.put(None)

    def wait_line(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            try:
                line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {text!r} within {timeout} s:\n{self.output}") from None
            if line is None:
                raise AssertionError(f"the demo ended without {text!r}:\n{self.output}")
            self.lines.append(line)

    def finish(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        while (line := self._q.get(timeout=5)) is not None:
            self.lines.append(line)
        return rc

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "run"
    yield d
    # Whatever the test found, nothing of this run outlives it.
    for entry in processes_in(d):
        os.kill(int(entry.split(":")[0]), signal.SIGKILL)


def test_the_plain_run_shows_the_whole_thing_and_leaves_nothing_running(run_dir: Path) -> None:
    demo = DemoProc(run_dir)
    try:
        rc = demo.finish(120)
    finally:
        demo.kill()
    wall = time.monotonic() - demo.started
    out = demo.output
    assert rc == 0, out
    assert "Traceback" not in out
    print(f"demo wall time {wall:.1f} s")
    assert wall < 60, f"the demo took {wall:.0f} s"
    # The web app was served with its demo users (tests/test_web_workflow.py tests it).
    assert "the quality manager's web app: http://127.0.0.1:" in out, out
    # Presses and the answer went over the broker; the broker outage was survived.
    assert out.count(" event  seq ") >= 9
    assert "answer   dr-petrov: q1 no, q2 yes, phone left" in out
    assert "the collector has stored every event up to seq 9" in out
    # The collector's views.
    assert "$ feedback-collector report loyalty --period day" in out
    assert "op-17" in out
    assert "dr-petrov" in out
    assert "-100.0" in out  # the doctor index of one "no"
    callbacks = out.split("$ feedback-collector callbacks")[1].split("$ feedback-collector")[0]
    assert PHONE in callbacks
    fleet = out.split("$ feedback-collector fleet")[1]
    assert "demo-clinic/reception-1  online" in fleet
    assert "9/9" in fleet
    # The alert reached the demo's webhook receiver, signed; the API and metrics are shown.
    assert "webhook opened: Reception unhappy at demo-clinic/desk-1" in out, out[-3000:]
    assert "signature checked" in out
    assert "curl -H 'Authorization: Bearer fc_" in out
    # The phone number is for the callback list: no log holds it.
    for log in run_dir.glob("*.log"):
        assert PHONE not in log.read_text(errors="replace"), log
    assert processes_in(run_dir) == []


def test_forever_ends_cleanly_on_ctrl_c_and_reaps_every_child(run_dir: Path) -> None:
    demo = DemoProc(run_dir, "--forever")
    try:
        demo.wait_line("running until Ctrl-C", 120)
        children = processes_in(run_dir)
        for name in CHILDREN:
            assert any(name in c for c in children), (name, children)
        # No child inherited a blocked SIGINT or SIGTERM (it would ignore the stop).
        # Only the Python ones are asked: Mosquitto blocks them itself around pselect().
        mask = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
        for c in children:
            if " -m " not in c:
                continue
            blocked = blocked_signals(int(c.split(":")[0]))
            assert blocked is None or blocked & mask == 0, c
        sent = time.monotonic()
        demo.proc.send_signal(signal.SIGINT)
        rc = demo.finish(20)
        took = time.monotonic() - sent
    finally:
        demo.kill()
    out = demo.output
    assert rc == 0, out
    assert took < 15, f"{took:.1f} s from Ctrl-C to exit"
    assert "Traceback" not in out
    assert processes_in(run_dir) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_in_the_middle_of_the_script_stops_everything(run_dir: Path,
                                                               sig: signal.Signals) -> None:
    demo = DemoProc(run_dir, "--forever")
    try:
        demo.wait_line("  press  ", 120)
        demo.proc.send_signal(sig)
        rc = demo.finish(20)
    finally:
        demo.kill()
    out = demo.output
    assert rc == 128 + sig, out
    assert "Traceback" not in out
    assert processes_in(run_dir) == []


def _demo_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_script", DEMO)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stop_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    demo_mod = _demo_module()
    saved = {s: signal.getsignal(s) for s in demo_mod.Signals.HANDLED}
    signals = demo_mod.Signals()
    try:
        demo = demo_mod.Demo(tmp_path, signals)
        ready = tmp_path / "ready"
        demo.spawn("stubborn", [sys.executable, "-c",
                                "import signal, pathlib\n"
                                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                f"pathlib.Path({str(ready)!r}).touch()\n"
                                "while True: signal.pause()\n"])
        wait_for(ready.exists, 10, "the child ignoring SIGTERM")
        p = demo.procs["stubborn"]
        started = time.monotonic()
        demo.stop("stubborn", grace=1.0)
        assert time.monotonic() - started < 5
        assert p.returncode == -signal.SIGKILL
        assert demo.procs == {}
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_a_run_directory_the_demo_did_not_make_is_left_alone(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    out = subprocess.run([sys.executable, str(DEMO), "--dir", str(precious)], cwd=ROOT,
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 2
    assert "not a demo's run directory" in out.stderr
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_a_part_that_fails_ends_the_demo_with_its_log_and_reaps_the_rest(tmp_path: Path) -> None:
    # A unix socket path longer than 107 bytes cannot be bound: the simulators die at once.
    run_dir = tmp_path / ("d" * 100) / "run"
    demo = DemoProc(run_dir)
    try:
        rc = demo.finish(60)
    finally:
        demo.kill()
        for entry in processes_in(run_dir):
            os.kill(int(entry.split(":")[0]), signal.SIGKILL)
    out = demo.output
    assert rc == 1, out
    assert "exited (" in out  # which part, and the end of its log
    assert "path too long" in out
    assert "Traceback" not in out
    assert processes_in(run_dir) == []
