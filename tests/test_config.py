"""Config mistakes are named precisely; the CLI exits 2 without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from edge.config import parse_config
from edge.contract.toml import ConfigError
from edge.control import query
from tests.conftest import wait_for

GOOD = """
site = "clinic-3"
edge = "reception-1"
[broker]
host = "localhost"
[[devices]]
kind = "console"
serial = "00A1B2C3D4E5"
desk = "desk-2"
"""


def _parse(text: str) -> None:
    parse_config(tomllib.loads(text), "edge.toml")


def test_a_minimal_config_gets_sensible_defaults() -> None:
    cfg = parse_config(tomllib.loads(GOOD))
    assert cfg.topic_root == "feedback/v1/clinic-3/reception-1"
    assert cfg.broker.port == 1883
    assert cfg.devices[0].id == "fc3-00a1b2c3d4e5"
    assert cfg.store.path == Path("/var/lib/feedback-edge/outbox.sqlite")


@pytest.mark.parametrize(("text", "key", "value", "allowed"), [
    (GOOD.replace('"clinic-3"', '"Clinic 3"'), "site", "'Clinic 3'", "lower-case"),
    (GOOD.replace('host = "localhost"', 'host = "localhost"\nport = 70000'),
     "broker.port", "70000", "integer from 1 to 65535"),
    (GOOD.replace('host = "localhost"', 'host = "mqtt.example.org"'),
     "broker.host", "'mqtt.example.org'", "plain TCP is allowed only to localhost"),
    (GOOD.replace('host = "localhost"', 'host = "localhost"\nprot = 1883'),
     "broker.prot", "1883", "did you mean 'port'"),
    (GOOD.replace('serial = "00A1B2C3D4E5"', 'serial = "00a1b2"'),
     "devices[0].serial", "'00a1b2'", "12 upper-case hex digits"),
    (GOOD.replace('kind = "console"', 'kind = "toaster"'),
     "devices[0].kind", "'toaster'", "one of console"),
    (GOOD.replace('serial = "00A1B2C3D4E5"\n', ""),
     "devices[0].serial", "(missing)", "required for a USB console"),
    (GOOD.replace('desk = "desk-2"', 'desk = "desk-2"\ntransport = "socket"'),
     "devices[0].socket", "(missing)", "required when transport"),
    (GOOD + '[store]\nmax_events = "lots"\n', "store.max_events", "'lots'", "integer"),
    (GOOD.replace('[broker]\nhost = "localhost"', ""), "broker", "(missing)", "required"),
    (GOOD + "[[devices]]\nkind = \"console\"\nserial = \"00A1B2C3D4E5\"\ndesk = \"d\"\n",
     "devices[1].id", "'fc3-00a1b2c3d4e5'", "must be unique"),
])
def test_mistakes_name_the_key_the_value_and_what_is_allowed(text: str, key: str, value: str,
                                                             allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        _parse(text)
    assert info.value.key == key
    message = str(info.value)
    assert message.startswith(f"edge.toml: {key} = {value}: ")
    assert allowed in message


def test_password_never_appears_in_errors_or_repr(tmp_path: Path) -> None:
    secret = "s3cret-pa55"
    text = GOOD.replace('host = "localhost"',
                        f'host = "localhost"\nusername = "u"\npassword = "{secret}"\n'
                        f'password_file = "{tmp_path / "pw"}"')
    (tmp_path / "pw").write_text("other")
    with pytest.raises(ConfigError) as info:
        _parse(text)
    assert secret not in str(info.value)
    cfg = parse_config(tomllib.loads(GOOD.replace(
        'host = "localhost"', f'host = "localhost"\nusername = "u"\npassword = "{secret}"')))
    assert secret not in repr(cfg)


@pytest.mark.parametrize("content", [
    "site = ", "site = \"x\"\n[broker]\nhost = 5\n", "\xff\xfe not utf8",
])
def test_cli_check_config_exits_2_with_one_clear_line(tmp_path: Path, content: str) -> None:
    path = tmp_path / "edge.toml"
    path.write_bytes(content.encode("latin-1"))
    out = subprocess.run([sys.executable, "-m", "edge.cli", "check-config", str(path)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("feedback-edge: config error: ")
    assert len(out.stderr.strip().splitlines()) == 1


def test_cli_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(GOOD)
    out = subprocess.run([sys.executable, "-m", "edge.cli", "check-config", str(path)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_cli_run_with_a_missing_config_exits_2(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "edge.cli", "run", "--config",
                          str(tmp_path / "nope.toml")], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 2
    assert "cannot be read" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_run_with_an_unwritable_store_keeps_running_alarms_and_recovers(
        tmp_path: Path) -> None:
    """A store that cannot be created is a fault of the surroundings: the daemon
    runs on (systemd would restart an exiting one in a loop), says so in status,
    and opens the store once its directory can be made."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's directory should be")
    path = tmp_path / "edge.toml"
    control = tmp_path / "control.sock"
    path.write_text(GOOD.replace("[broker]", f'[daemon]\ncontrol_socket = "{control}"\n'
                                 '[web]\nenabled = false\n[broker]')
                    + f'[store]\npath = "{blocker}/outbox.sqlite"\n')
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        st = wait_for(lambda: _status(control), 15, "status from the daemon")
        assert any(a.startswith("store_read_only: ") for a in st["alarms"]), st["alarms"]
        blocker.unlink()
        wait_for(lambda: (s := _status(control)) and not any(
            a.startswith("store_") for a in s["alarms"]), 15, "the store opened")
        assert proc.poll() is None
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert "Traceback" not in err


def _status(control: Path) -> dict[str, Any] | None:
    try:
        return query(control, timeout=2)
    except (OSError, ValueError):
        return None


def test_check_config_refuses_a_ca_file_that_is_not_a_certificate(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    text = GOOD.replace('host = "localhost"', f'host = "localhost"\n[broker.tls]\n'
                        f'ca_file = "{bad}"')
    with pytest.raises(ConfigError, match=r"broker\.tls\.ca_file .* must hold PEM CA"):
        _parse(text)
    good = Path(__file__).parent / "fixtures" / "ca.pem"
    _parse(text.replace(str(bad), str(good)))


@pytest.mark.parametrize(("doctors", "why"), [
    ({"rev": 1, "doctors": [{"id": "dr-a", "name": "A", "specialty": "", "photo": ""}]},
     "photo"),
    ({"rev": 1, "doctors": [{"id": "dr a", "name": "A", "specialty": ""}]}, "id"),
    ([1, 2], "doctor list"),
])
def test_check_config_refuses_an_unusable_doctors_file(tmp_path: Path, doctors: object,
                                                      why: str) -> None:
    f = tmp_path / "doctors.json"
    f.write_text(json.dumps(doctors))
    with pytest.raises(ConfigError, match=rf"survey\.doctors_file .*{why}"):
        _parse(GOOD + f'[survey]\ndoctors_file = "{f}"\n')


def test_a_second_daemon_on_the_same_state_exits_2_naming_the_first(tmp_path: Path) -> None:
    control = tmp_path / "control.sock"
    path = tmp_path / "edge.toml"
    path.write_text(GOOD.replace("[broker]", f'[daemon]\ncontrol_socket = "{control}"\n'
                                 '[web]\nenabled = false\n[broker]')
                    + f'[store]\npath = "{tmp_path}/state/outbox.sqlite"\n')
    first = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        st = wait_for(lambda: _status(control), 15, "the first daemon")
        second = subprocess.run([sys.executable, "-m", "edge.cli", "run", "--config", str(path)],
                                capture_output=True, text=True, check=False, timeout=30)
        assert second.returncode == 2
        assert f"PID {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        # The first one still owns its control socket and its store.
        assert _status(control) is not None
        assert st["pid"] == first.pid
    finally:
        first.terminate()
        first.wait(15)
    assert first.returncode == 0


def test_status_exits_0_only_without_alarms(tmp_path: Path) -> None:
    control = tmp_path / "control.sock"
    path = tmp_path / "edge.toml"
    path.write_text(GOOD.replace("[broker]", f'[daemon]\ncontrol_socket = "{control}"\n'
                                 '[web]\nenabled = false\n[broker]')
                    + f'[store]\npath = "{tmp_path}/state/outbox.sqlite"\n')
    status = [sys.executable, "-m", "edge.cli", "status", "--config", str(path)]

    def run_and_ask() -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
        daemon = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config",
                                   str(path)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            st = wait_for(lambda: _status(control), 15, "the daemon")
            return subprocess.run(status, capture_output=True, text=True, check=False,
                                  timeout=30), st
        finally:
            daemon.terminate()
            daemon.wait(15)

    # Freshly started: nothing has lasted long enough to need a person.
    ok, st = run_and_ask()
    assert st["alarms"] == []
    assert ok.returncode == 0
    # A damaged state file is an alarm from the start: exit 3.
    (tmp_path / "state" / "doctors.json").write_text("{ not json")
    alarmed, st = run_and_ask()
    assert [a.split(":")[0] for a in st["alarms"]] == ["state_unreadable"]
    assert alarmed.returncode == 3
    assert "ALARM" in alarmed.stdout
    down = subprocess.run(status, capture_output=True, text=True, check=False, timeout=30)
    assert down.returncode == 1
    assert "NOT RUNNING" in down.stdout


@pytest.mark.parametrize(("content", "why"), [
    (b"\xff\xfebad", "must be UTF-8 text"),
    (b"", "is empty"),
    (b"  \n", "is empty"),
    (b"one\ntwo\n", "only the secret, on one line"),
])
def test_a_password_file_is_one_line_of_text(tmp_path: Path, content: bytes, why: str) -> None:
    f = tmp_path / "mqtt-password"
    f.write_bytes(content)
    text = GOOD.replace('host = "localhost"', f'host = "localhost"\nusername = "u"\n'
                        f'password_file = "{f}"')
    with pytest.raises(ConfigError, match=why) as e:
        _parse(text)
    assert "two" not in str(e.value)  # never the secret itself


def test_an_encrypted_client_key_is_refused_not_prompted_for(tmp_path: Path) -> None:
    key, cert = tmp_path / "client.key", tmp_path / "client.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=client",
                    "-passout", "pass:secret"], check=True, capture_output=True,
                   stdin=subprocess.DEVNULL)
    ca = Path(__file__).parent / "fixtures" / "ca.pem"
    text = GOOD.replace('host = "localhost"', f'host = "localhost"\n[broker.tls]\n'
                        f'ca_file = "{ca}"\ncert_file = "{cert}"\nkey_file = "{key}"')
    with pytest.raises(ConfigError, match="unencrypted PEM key"):
        _parse(text)


def test_two_tables_naming_the_same_console_are_refused(tmp_path: Path) -> None:
    """Both would open one /dev/hidraw node: every press stored twice, at two desks."""
    from edge.config import load_config
    from tests.conftest import write_config

    cfg = write_config(tmp_path / "edge.toml", port=1883, store=tmp_path / "o.sqlite",
                       devices=[{"kind": "console", "desk": "desk-1", "serial": "00A1B2C3D4E5"},
                                {"kind": "console", "desk": "desk-2", "serial": "00A1B2C3D4E5",
                                 "id": "fc3-other"}])
    with pytest.raises(ConfigError, match=r"devices\[1\]\.serial.*must be unique"):
        load_config(cfg)
