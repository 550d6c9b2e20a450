"""`feedback-collector web ...` as an installer meets it: config mistakes in one
line, `adduser` on an existing user keeps what it was not given, `unlock` lifts
a lockout after wrong passwords (a real served app, a real SQLite file)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Proc
from tests.web_fixtures import PASSWORD, HttpSession, served_url, web_cli


def _run(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "collector.cli", "web", "--config",
                           str(config), *args], input=stdin, capture_output=True, text=True,
                          check=False, timeout=120)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "collector.toml"
    cfg.write_text(f'id = "central-1"\n[broker]\nhost = "127.0.0.1"\n[database]\n'
                   f'path = "{tmp_path}/feedback.sqlite"\n', encoding="utf-8")
    web_cli(cfg, "migrate")
    return cfg


@pytest.fixture
def served(config: Path, tmp_path: Path) -> Iterator[str]:
    log = tmp_path / "web.log"
    proc = Proc(["collector.cli", "web", "--config", str(config), "serve", "--bind",
                 "127.0.0.1:0", "--tick-s", "3600"], log).start()
    try:
        yield served_url(proc, log)
    finally:
        proc.kill()


def test_a_config_mistake_is_one_line_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "collector.toml"
    cfg.write_text('id = "central-1"\n[broker]\nhost = "127.0.0.1"\n[web.limits]\n'
                   '"in progress" = 48\n', encoding="utf-8")
    for command in ("migrate", "tick", "serve"):
        r = _run(cfg, command)
        assert r.returncode == 2, (command, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        assert "web.limits.in progress" in r.stderr, r.stderr
        assert "in_progress" in r.stderr, r.stderr


def test_adduser_on_an_existing_user_keeps_what_it_was_not_given(config: Path) -> None:
    out = web_cli(config, "adduser", "anna", "--role", "callback_officer", "--email",
                  "anna@clinic.example", "--language", "ru", stdin=PASSWORD + "\n")
    assert "created" in out
    out = web_cli(config, "adduser", "anna", "--role", "quality_manager",
                  stdin=PASSWORD + "-new\n")
    assert "updated" in out
    r = _run(config, "adduser", "anna", "--role", "quality_manager", stdin="")
    assert r.returncode == 2
    assert "no password on standard input" in r.stderr
    from collector.db import open_database

    db = open_database(config.parent / "feedback.sqlite")
    try:
        assert db.query("SELECT email, language, role FROM feedback_user "
                        "WHERE username = 'anna'") == [
            ("anna@clinic.example", "ru", "quality_manager")]
    finally:
        db.close()


def test_unlock_lifts_a_lockout_after_wrong_passwords(config: Path, served: str) -> None:
    web_cli(config, "adduser", "anna", "--role", "quality_manager", stdin=PASSWORD + "\n")
    s = HttpSession(served)
    for _ in range(5):
        s.request("login/")
        s.request("login/", {"csrfmiddlewaretoken": s.csrf(), "username": "anna",
                             "password": "not-the-password"})
    s.request("login/")
    status, _, _ = s.request("login/", {"csrfmiddlewaretoken": s.csrf(), "username": "anna",
                                        "password": PASSWORD})
    assert status == 429, "not locked out after 5 wrong passwords"
    assert "they may log in again" in web_cli(config, "unlock", "anna")
    HttpSession(served).login("anna")
