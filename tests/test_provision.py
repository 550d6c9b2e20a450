"""`feedback-edge provision`: the files a first boot needs, checked by the tools
that will read them (Debian's cloud-init, sed, pip, systemd), and the first-boot
installer run for real into a scratch root."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge.provision import (
    FIRSTRUN_ARGS,
    PI_TARGETS,
    Options,
    ProvisionError,
    build_wheelhouse,
    check_wheelhouse,
    host_target,
    provision,
)

CLOUD_INIT = shutil.which("cloud-init")
SYSTEM_PYTHON = "/usr/bin/python3"  # cloud-init's own interpreter, with its YAML parser
ORIGINAL_CMDLINE = ("console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 "
                    "rootfstype=ext4 fsck.repair=yes rootwait quiet splash "
                    "plymouth.ignore-serial-consoles")
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDummyKeyForTestsOnly0000000000000000 installer@office"
SSID = 'Clinic: guest # 2 "net"'
PSK = "correct horse battery staple"


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One wheelhouse for the Pis and this machine, built from the checkout and PyPI."""
    dest = tmp_path_factory.mktemp("wheels")
    build_wheelhouse(dest, (*PI_TARGETS, host_target()))
    return dest


def make_bootfs(root: Path, os_name: str) -> Path:
    """The boot partition of a freshly flashed Raspberry Pi OS Lite card."""
    boot = root / "bootfs"
    boot.mkdir()
    (boot / "config.txt").write_text("# http://rptl.io/configtxt\ndtparam=audio=on\n")
    (boot / "cmdline.txt").write_text(ORIGINAL_CMDLINE + "\n")
    (boot / "bcm2712-rpi-5-b.dtb").write_bytes(b"\xd0\x0d\xfe\xed")
    (boot / "kernel8.img").write_bytes(b"\0" * 16)
    if os_name == "trixie":
        (boot / "meta-data").write_text("instance-id: rpios-image\n")
        (boot / "user-data").write_text("#cloud-config\n")
        (boot / "network-config").write_text("network:\n  version: 2\n")
    return boot


def make_site(root: Path, extra: str = "") -> Path:
    """The installer's site folder: edge.toml and the files it names, side by side."""
    site = root / "site"
    site.mkdir()
    (site / "mqtt-password").write_text("broker-secret-123\n")
    # A real (self-signed, test-only) CA certificate: check-config loads it as TLS will.
    shutil.copy(Path(__file__).parent / "fixtures" / "ca.pem", site / "ca.pem")
    (site / "doctors.json").write_text(json.dumps({"rev": 1, "doctors": []}))
    (site / "edge.toml").write_text(f"""\
site = "clinic-3"
edge = "reception-1"

[broker]
host = "mqtt.clinic.example"
port = 8883
username = "reception-1"
password_file = "mqtt-password"

[broker.tls]
ca_file = "ca.pem"

[survey]
doctors_file = "doctors.json"

[[devices]]
kind = "console"
desk = "front"
serial = "00A1B2C3D4E5"

[[devices]]
kind = "keyboard"
desk = "front"
vid = 0x05ac
pid = 0x0220
usb_port = "1-1.4"
keys = {{ "0x1e" = ["good", 1], "0x1f" = ["neutral", 0], "0x20" = ["bad", -1] }}
{extra}""")
    return site / "edge.toml"


def yaml_load(path: Path) -> Any:
    """Parse with the YAML parser cloud-init itself uses."""
    out = subprocess.run([SYSTEM_PYTHON, "-c", "import json, sys, yaml; "
                          "print(json.dumps(yaml.safe_load(open(sys.argv[1]))))", str(path)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.fixture
def card(tmp_path: Path, wheelhouse: Path) -> dict[str, Path]:
    (tmp_path / "psk").write_text(PSK + "\n")
    (tmp_path / "key.pub").write_text(KEY + "\n")
    return {"root": tmp_path, "psk": tmp_path / "psk", "key": tmp_path / "key.pub",
           "wheels": wheelhouse}


def _options(card: dict[str, Path], boot: Path, config: Path, **kw: Any) -> Options:
    base: dict[str, Any] = {"wifi_ssid": SSID, "wifi_psk_file": card["psk"],
                            "wifi_country": "DE", "ssh_key": card["key"],
                            "wheelhouse": card["wheels"],
                            "targets": (*PI_TARGETS, host_target())}
    base.update(kw)
    return Options(boot, config, **base)


@pytest.mark.skipif(CLOUD_INIT is None, reason="Debian's cloud-init is not installed "
                    "(scripts/test installs it when run as root)")
def test_trixie_card_validates_with_cloud_init(card: dict[str, Path]) -> None:
    boot = make_bootfs(card["root"], "trixie")
    summary = provision(_options(card, boot, make_site(card["root"])))
    assert any("Trixie" in line for line in summary)

    schema = subprocess.run([CLOUD_INIT, "schema", "--config-file", str(boot / "user-data")],
                            capture_output=True, text=True, check=False)
    assert schema.returncode == 0, schema.stdout + schema.stderr
    assert "Valid cloud-config" in schema.stdout

    doc = yaml_load(boot / "user-data")
    assert doc["hostname"] == "clinic-3-reception-1"
    assert doc["users"][0]["name"] == "admin"
    assert doc["users"][0]["ssh_authorized_keys"] == [KEY]
    assert doc["users"][0]["lock_passwd"] is True
    assert doc["ssh_pwauth"] is False
    assert "/boot/firmware/feedback/install.sh" in doc["runcmd"][-1][-1]
    meta = yaml_load(boot / "meta-data")
    assert meta["instance-id"].startswith("feedback-clinic-3-reception-1-")
    assert meta["instance-id"] != "rpios-image"

    # The network config as cloud-init parses and renders it for netplan (on
    # Raspberry Pi OS Trixie netplan hands it to NetworkManager; cloud-init
    # renders Wi-Fi for netplan only): the SSID with ': ', '#' and quotes
    # survives intact.
    out = card["root"] / "netplan"
    conv = subprocess.run([CLOUD_INIT, "devel", "net-convert", "-p", str(boot / "network-config"),
                           "-k", "yaml", "-D", "debian", "-O", "netplan", "-d", str(out)],
                          capture_output=True, text=True, check=False)
    assert conv.returncode == 0, conv.stderr
    assert "WARNING" not in conv.stderr, conv.stderr
    (rendered,) = out.rglob("*.yaml")
    net = yaml_load(rendered)["network"]
    assert net["wifis"]["wlan0"]["access-points"] == {SSID: {"password": PSK}}
    assert net["wifis"]["wlan0"]["regulatory-domain"] == "DE"
    assert net["ethernets"]["eth0"]["dhcp4"] is True


def test_bookworm_card_boots_into_firstrun_once(card: dict[str, Path]) -> None:
    boot = make_bootfs(card["root"], "bookworm")
    config = make_site(card["root"])
    provision(_options(card, boot, config))
    provision(_options(card, boot, config))  # provisioning twice adds the hook once
    lines = (boot / "cmdline.txt").read_text().splitlines()
    assert lines == [f"{ORIGINAL_CMDLINE} {FIRSTRUN_ARGS}"]

    # firstrun.sh's own sed command gives the image its original cmdline.txt back.
    script = (boot / "feedback" / "firstrun.sh").read_text()
    sed = re.search(r"sed -i '([^']+)' \\\n\s+/boot/firmware/cmdline.txt", script)
    assert sed is not None
    subprocess.run(["sed", "-i", sed.group(1), str(boot / "cmdline.txt")], check=True)
    assert (boot / "cmdline.txt").read_text() == ORIGINAL_CMDLINE + "\n"
    assert "systemd.run=/boot/firmware/feedback/firstrun.sh" in FIRSTRUN_ARGS

    bundle = boot / "feedback"
    assert (bundle / "hostname").read_text() == "clinic-3-reception-1\n"
    assert (bundle / "authorized_keys").read_text() == KEY + "\n"
    keyfile = (bundle / "wifi.nmconnection").read_text()
    assert "ssid=Clinic: guest # 2 \"net\"" in keyfile
    assert f"psk={PSK}" in keyfile
    assert (bundle / "wifi-country").read_text() == "DE\n"
    assert not (boot / "user-data").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="install.sh sets root:feedback-edge ownership; "
                    "needs root (CI runs as root)")
def test_first_boot_installer_installs_offline_into_a_fresh_venv(card: dict[str, Path]) -> None:
    boot = make_bootfs(card["root"], "trixie")
    provision(_options(card, boot, make_site(card["root"])))
    root = card["root"] / "pi-root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group"):
        (root / "etc" / name).write_text("root:x:0:0:root:/root:/bin/bash\n" if name == "passwd"
                                         else "root:x:0:\n")
    env = {"PATH": os.environ["PATH"], "FEEDBACK_ROOT": str(root),
           "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
    run = subprocess.run(["sh", str(boot / "feedback" / "install.sh")], env=env,
                         capture_output=True, text=True, check=False, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "feedback-edge install: installed" in run.stdout

    venv = root / "opt" / "feedback-edge" / "venv"
    etc = root / "etc" / "feedback-edge"
    check = subprocess.run([str(venv / "bin" / "feedback-edge"), "check-config",
                            str(etc / "edge.toml")], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    probe = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import edge, paho.mqtt, serial, tinydb; "
                            "print(edge.__file__)"], capture_output=True, text=True, check=False,
                           cwd=root)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.startswith(str(venv))  # its own copy, not this checkout

    group = {ln.split(":")[0]: ln.split(":") for ln in
             (root / "etc" / "group").read_text().splitlines()}
    assert "feedback-edge" in group
    secret = etc / "mqtt-password"
    assert secret.stat().st_gid == int(group["feedback-edge"][2])
    assert secret.stat().st_mode & 0o777 == 0o640
    assert (root / "etc/systemd/system/multi-user.target.wants/feedback-edge.service").is_symlink()
    site_rules = (root / "etc/udev/rules.d/71-feedback-edge-site.rules").read_text()
    assert 'ATTRS{idVendor}=="05ac"' in site_rules
    assert (root / "etc/udev/rules.d/70-feedback-edge.rules").is_file()
    # The secrets have left the FAT partition.
    assert not (boot / "feedback" / "site").exists()
    assert (boot / "feedback" / "installed").is_file()


def test_wheelhouse_resolves_offline_for_every_pi(wheelhouse: Path) -> None:
    check_wheelhouse(wheelhouse)  # raises if any target cannot install from it alone
    names = sorted(p.name for p in wheelhouse.glob("*.whl"))
    # Pure Python only: one wheelhouse serves aarch64 and armv7, Python 3.11 and 3.13.
    assert all(n.endswith("-py3-none-any.whl") or n.endswith("-py2.py3-none-any.whl")
               for n in names), names
    assert any(n.startswith("paho_mqtt-") for n in names), names


def test_an_incomplete_wheelhouse_is_refused(wheelhouse: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(wheelhouse, partial)
    for p in partial.glob("paho_mqtt-*.whl"):
        p.unlink()
    with pytest.raises(ProvisionError, match="bookworm-arm64"):
        check_wheelhouse(partial)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge.cli", "provision", *args],
                          capture_output=True, text=True, check=False)


def _untouched(boot: Path) -> bool:
    return (not (boot / "feedback").exists()
            and (boot / "cmdline.txt").read_text() == ORIGINAL_CMDLINE + "\n")


def test_refuses_a_directory_that_is_not_a_pi_boot_partition(card: dict[str, Path]) -> None:
    config = make_site(card["root"])
    other = card["root"] / "usb-stick"
    other.mkdir()
    (other / "config.txt").write_text("not a pi\n")
    r = _cli(str(other), "--config", str(config), "--wheelhouse", str(card["wheels"]))
    assert r.returncode == 2
    assert "is not a Raspberry Pi OS boot partition" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in other.iterdir()) == ["config.txt"]


def test_refuses_a_config_that_does_not_validate(card: dict[str, Path]) -> None:
    boot = make_bootfs(card["root"], "bookworm")
    config = make_site(card["root"], extra="\n[store]\nmax_events = -5\n")
    r = _cli(str(boot), "--config", str(config), "--wheelhouse", str(card["wheels"]))
    assert r.returncode == 2
    assert "the config does not validate" in r.stderr
    assert "store.max_events" in r.stderr
    assert _untouched(boot)


@pytest.mark.parametrize("flag", ["--wifi-psk", "--wifi-psk=hunter2-secret", "--password"])
def test_refuses_secrets_on_the_command_line(card: dict[str, Path], flag: str) -> None:
    boot = make_bootfs(card["root"], "bookworm")
    args = [str(boot), "--config", str(make_site(card["root"])), "--wifi", "x", flag]
    if "=" not in flag:
        args.append("hunter2-secret")
    r = _cli(*args)
    assert r.returncode == 2
    assert "secrets are not taken on the command line" in r.stderr
    assert "hunter2" not in r.stderr
    assert _untouched(boot)


@pytest.mark.parametrize(("change", "message"), [
    ({"ssh_key": "PRIVATE"}, "is a private key"),
    ({"wifi_country": None}, "--wifi-country"),
    ({"wifi_psk_file": "SHORT"}, "8 to 63 printable ASCII"),
    ({"hostname": "Bad_Name"}, "--hostname"),
    ({"config": "ABSOLUTE"}, "relative to edge.toml"),
    ({"config": "MISSING"}, "which is not next to edge.toml"),
    ({"config": "STORE"}, "/var/lib/feedback-edge"),
])
def test_refusals_name_the_problem_and_write_nothing(card: dict[str, Path],
                                                     change: dict[str, Any],
                                                     message: str) -> None:
    boot = make_bootfs(card["root"], "bookworm")
    config = make_site(card["root"])
    kw = dict(change)
    if kw.get("ssh_key") == "PRIVATE":
        key = card["root"] / "id_ed25519"
        key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n"
                       "-----END OPENSSH PRIVATE KEY-----\n")
        kw["ssh_key"] = key
    if kw.get("wifi_psk_file") == "SHORT":
        (card["root"] / "short").write_text("abc\n")
        kw["wifi_psk_file"] = card["root"] / "short"
    target = kw.pop("config", None)
    text = config.read_text()
    if target == "ABSOLUTE":
        config.write_text(text.replace('ca_file = "ca.pem"', f'ca_file = "{config.parent}/ca.pem"'))
    elif target == "MISSING":
        config.write_text(text.replace('doctors_file = "doctors.json"',
                                       'doctors_file = "doctors-2026.json"'))
    elif target == "STORE":
        config.write_text(text.replace("[survey]", '[store]\npath = "/tmp/outbox.sqlite"\n\n'
                                       "[survey]"))
    with pytest.raises(ProvisionError, match=re.escape(message)):
        provision(_options(card, boot, config, **kw))
    assert _untouched(boot)
