"""A survey terminal site for black-box tests: the simulator (`feedback-sim
terminal`) on a real pty, the daemon process reading it with pyserial, a real
Mosquitto; SIGKILL of the simulator is a power cut, of the daemon a crash.

`TerminalSite(..., serial_in_config=False)` configures the terminal by port
only (as RS-232 units are); `rs232=True` runs the simulator as an RS-232 unit
that cannot see the daemon open the port (HELLO only at power-up and on WHO).
"""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge.control import query
from firmware_sim.server import control
from tests.conftest import Broker, Proc, wait_for, write_config

__all__ = ["COMMENT_RU", "SERIAL", "TerminalSite", "sixty_doctors"]

SERIAL = "00C0FFEE0001"

# What a patient writes, 500 characters (the sheet's limit): 933 bytes in UTF-8.
COMMENT_RU = ("Здравствуйте! Записывалась заблаговременно, однако ожидала приёма полтора часа, "
              "никаких объяснений регистратура предоставить не потрудилась. Доктор внимательная, "
              "подробно рассказала про обследование, назначения, побочные эффекты препаратов. "
              "Регистраторы разговаривают пренебрежительно, дозвониться невозможно, электронная "
              "запись постоянно недоступна. Пожилой маме тяжело выстаивать очереди: в коридоре "
              "недостаточно стульев, душно, кондиционер неисправен. Перезвоните, пожалуйста, "
              "вечером, днём нахожусь на работе. Благодарю заранее за понимание и внимательность!")
COMMENT_RU = (COMMENT_RU * 2)[:500]

DOCTORS = {"rev": 4, "doctors": [
    {"id": "dr-petrov", "name": "Dr Petrov", "specialty": "ENT", "photo": None}]}


def sixty_doctors(rev: int) -> dict[str, Any]:
    """A clinic's 60 doctors: full Russian names, specialties, photo hashes (~10 KB)."""
    surnames = ["Иванова", "Петров", "Сидорова", "Кузнецов", "Смирнова", "Васильев",
                "Попова", "Соколов", "Михайлова", "Новиков", "Фёдорова", "Морозов",
                "Волкова", "Алексеев", "Лебедева", "Семёнов", "Егорова", "Павлов",
                "Козлова", "Степанов"]
    names = ["Анна Сергеевна", "Дмитрий Александрович", "Екатерина Викторовна",
             "Михаил Юрьевич", "Ольга Николаевна", "Константин Игоревич"]
    specialties = ["Оториноларинголог", "Кардиолог", "Гастроэнтеролог", "Невролог",
                   "Эндокринолог", "Офтальмолог", "Терапевт", "Дерматовенеролог",
                   "Травматолог-ортопед", "Акушер-гинеколог"]
    doctors = []
    for i in range(60):
        name = f"{surnames[i % 20]} {names[i % 6]}"
        doctors.append({"id": f"dr-{i + 1:03d}", "name": name,
                        "specialty": specialties[i % 10],
                        "photo": hashlib.sha256(name.encode() + bytes([i])).hexdigest()})
    return {"rev": rev, "doctors": doctors}


class TerminalSite:
    def __init__(self, tmp: Path, broker: Broker, procs: Callable[[list[str], Path], Proc],
                 script: list[dict[str, Any]], *, serial_in_config: bool = True,
                 rs232: bool = False, doctors: dict[str, Any] | None = None) -> None:
        self.tmp = tmp
        self.procs = procs
        self.rs232 = rs232
        self.link = tmp / "st3.tty"
        self.flash = tmp / "st3.flash"
        self.ctl = tmp / "st3.ctl"
        self.script_file = tmp / "day.json"
        self.script_file.write_text(json.dumps(script))
        self.doctors_file = tmp / "doctors.json"
        self.doctors_file.write_text(json.dumps(doctors or DOCTORS, ensure_ascii=False),
                                     encoding="utf-8")
        device: dict[str, Any] = {"kind": "terminal", "desk": "office-12",
                                  "port": str(self.link)}
        if serial_in_config:
            device["serial"] = SERIAL
        self.config = write_config(
            tmp / "edge.toml", port=broker.port, store=tmp / "state" / "outbox.sqlite",
            devices=[device], extra=f'\n[survey]\ndoctors_file = "{self.doctors_file}"')
        self.terminal: Proc | None = None
        self.daemon: Proc | None = None

    def power_on(self) -> None:
        self.terminal = self.procs(
            ["firmware_sim.cli", "terminal", "run", "--link", str(self.link), "--flash",
             str(self.flash), "--serial", SERIAL, "--control", str(self.ctl), "--script",
             str(self.script_file), *(["--rs232"] if self.rs232 else [])],
            self.tmp / "terminal.log")
        wait_for(lambda: self.link.exists() and self.ctl.exists(), 10, "terminal pty")

    def power_cut(self) -> None:
        assert self.terminal is not None
        self.terminal.kill(signal.SIGKILL)
        self.link.unlink(missing_ok=True)
        self.ctl.unlink(missing_ok=True)

    def start(self) -> None:
        self.daemon = self.procs(["edge.cli", "run", "--config", str(self.config)],
                                 self.tmp / "daemon.log")

    def state(self) -> dict[str, Any]:
        return control(self.ctl, b"X", b"state")

    def answer(self, **fields: Any) -> int:
        """A patient answers on the terminal; the record's id."""
        reply = control(self.ctl, b"A", json.dumps({"kind": "answer", **fields}).encode())
        assert reply["ok"], reply
        return int(reply["id"])

    def status(self) -> dict[str, Any]:
        try:
            return query(self.tmp / "control.sock", timeout=2)
        except (OSError, ValueError):
            return {}

    def device(self) -> dict[str, Any]:
        """The terminal's entry in the daemon's status ({} while it does not answer)."""
        devices = self.status().get("devices") or [{}]
        entry: dict[str, Any] = devices[0]
        return entry

    def connected(self, timeout: float = 10) -> None:
        wait_for(lambda: self.state()["host_attached"], timeout, "daemon opened the port")
        wait_for(lambda: self.device().get("state") == "connected", timeout,
                 "terminal connected")
