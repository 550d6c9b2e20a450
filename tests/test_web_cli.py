"""`feedback-collector web ...` as an installer meets it: config mistakes in one
line, `adduser` on an existing user keeps what it was not given, `unlock` lifts
a lockout after wrong passwords (a real served app, a real SQLite file)."""

from __future__ import annotations

import sqlite3
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


def test_the_config_named_by_the_environment_is_every_commands_default(
        config: Path, tmp_path: Path) -> None:
    """README, Production: `export FEEDBACK_COLLECTOR_CONFIG=...` then `web migrate`,
    `web tick`, `web alert-rule`, `web token` without --config."""
    import os

    env = {**os.environ, "FEEDBACK_COLLECTOR_CONFIG": str(config)}
    for args in (["migrate"], ["tick"], ["alert-rule", "list"], ["token", "list"]):
        r = subprocess.run([sys.executable, "-m", "collector.cli", "web", *args], env=env,
                           capture_output=True, text=True, check=False, timeout=120,
                           cwd=tmp_path)
        assert r.returncode == 0, (args, r.stderr[-1500:])
    # --config still wins over the environment.
    r = subprocess.run([sys.executable, "-m", "collector.cli", "web", "--config",
                        str(tmp_path / "none.toml"), "tick"], env=env, capture_output=True,
                       text=True, check=False, timeout=120)
    assert r.returncode == 2
    assert "none.toml" in r.stderr
    assert "FEEDBACK_COLLECTOR_CONFIG" in r.stderr  # how to name one
    assert web_cli(config, "token", "list").startswith("no tokens")


@pytest.mark.parametrize(("now", "says"), [
    ("2026-11-30T08:10", "has no UTC offset"),
    ("tomorrow", "is not an ISO 8601 time"),
])
def test_tick_now_without_an_offset_or_not_a_time_is_refused_in_one_line(
        config: Path, now: str, says: str) -> None:
    r = _run(config, "tick", "--now", now)
    assert r.returncode == 2, r.stdout
    assert says in r.stderr
    assert "Traceback" not in r.stderr
    assert "Warning" not in r.stderr


def test_alert_rule_add_says_what_it_saved_ignores_aloud_and_is_audited(
        config: Path) -> None:
    r = _run(config, "alert-rule", "add", "--name", "Edge down", "--kind", "offline",
             "--duration-min", "20", "--threshold", "3", "--code", "disk_low",
             "--email", "quality@clinic.example")
    assert r.returncode == 0, r.stderr
    rule = int(r.stdout.strip())
    assert "--threshold is not read by an offline rule" in r.stderr
    assert "--code is not read by an offline rule" in r.stderr
    # No [web.smtp] in this config: said when the rule is saved.
    assert "no [web.smtp]" in r.stderr
    assert f"rule {rule}: offline, an edge offline or silent for 20 min" in r.stderr
    r = _run(config, "alert-rule", "add", "--name", "Desk 9's edge", "--kind", "offline",
             "--desk", "desk-9", "--email", "quality@clinic.example")
    assert r.returncode == 2
    assert "--desk: this kind watches edges or cases, not desks" in r.stderr
    r = _run(config, "alert-rule", "add", "--name", "x", "--kind", "silence", "--open", "8-18",
             "--email", "quality@clinic.example")
    assert r.returncode == 2
    assert "a span of local times like 08:00-18:00" in r.stderr
    assert "_span" not in r.stderr
    listed = web_cli(config, "alert-rule", "list")
    assert "an edge offline or silent for 20 min" in listed
    web_cli(config, "alert-rule", "disable", str(rule))
    db = sqlite3.connect(config.parent / "feedback.sqlite")
    try:
        audit = db.execute("SELECT username, action, detail FROM feedback_auditentry "
                           "ORDER BY id").fetchall()
    finally:
        db.close()
    assert audit == [("(system)", "alert_rule_saved", f"rule {rule} added (offline)"),
                     ("(system)", "alert_rule_disabled", f"rule {rule}")]


def test_adduser_on_an_existing_user_keeps_what_it_was_not_given(config: Path) -> None:
    out = web_cli(config, "adduser", "anna", "--role", "callback_officer", "--email",
                  "anna@clinic.example", "--language", "ru", stdin=PASSWORD + "\n")
    assert out == "anna: callback_officer (created)\n"  # one line, no library chatter
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
