"""`feedback-edge provision`: make a freshly flashed Raspberry Pi OS card come
up as a working edge on its first boot, with no keyboard, screen or network.

Everything goes onto the card's boot partition (FAT, mounted as
/boot/firmware on the Pi)::

    feedback/install.sh        the installer, run once as root (systemd/firstboot/)
    feedback/site/             edge.toml and the files it names (removed once installed)
    feedback/system/           unit, sysusers.d entry, udev rules (static + this site's)
    feedback/wheels/           the daemon and every dependency, for aarch64 and armv7,
                               Python 3.11 (Bookworm) and 3.13 (Trixie), plus pip
    feedback/install.log       written on the Pi: what the first boot did

and the first-boot hook of the image's generation:

- Trixie images boot with cloud-init (NoCloud seed on the boot partition):
  `user-data` (hostname, an SSH-key-only admin user, then install.sh),
  `meta-data` (a new instance-id, so cloud-init runs once for this card) and
  `network-config` (v2: Ethernet by DHCP, and the site's Wi-Fi).
- Bookworm images have no cloud-init: as Raspberry Pi Imager does,
  cmdline.txt gains `systemd.run=.../firstrun.sh`, and the settings go into
  plain files that firstrun.sh reads (the Wi-Fi as a NetworkManager keyfile).

The generation is recognised by the seed files Trixie's boot partition
carries (`meta-data`, `user-data`); `--os` overrides it.

Secrets never come from the command line (shell history, `ps`): the Wi-Fi
passphrase comes from a file, the broker password from the site folder.
Paths in the config that name files (password_file, TLS files, doctors_file,
token_file) must be relative to edge.toml, so the same site folder validates
here and works unchanged in /etc/feedback-edge on the Pi.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge.config import Config, load_config
from edge.contract.toml import ConfigError
from edge.deploy import udev_rules

__all__ = [
    "PI_TARGETS",
    "Options",
    "ProvisionError",
    "Target",
    "build_wheelhouse",
    "check_wheelhouse",
    "detect_os",
    "host_target",
    "network_config",
    "provision",
    "user_data",
]

PROJECT = Path(__file__).resolve().parents[1]
BUNDLE = "feedback"
PI_BOOT = "/boot/firmware"
FIRSTRUN_ARGS = (f"systemd.run={PI_BOOT}/{BUNDLE}/firstrun.sh systemd.run_success_action=reboot "
                 "systemd.unit=kernel-command-line.target")
STATE_DIR = Path("/var/lib/feedback-edge")
# Config keys that name files the daemon reads; they travel with edge.toml.
FILE_KEYS = (("broker", "password_file"), ("broker", "tls", "ca_file"),
             ("broker", "tls", "cert_file"), ("broker", "tls", "key_file"),
             ("survey", "doctors_file"), ("web", "token_file"))
HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\Z")
COUNTRY_RE = re.compile(r"^[A-Z]{2}\Z")
SECRET_FLAGS = ("--wifi-psk", "--psk", "--password", "--wifi-password", "--passphrase")


class ProvisionError(Exception):
    """The card, the config or an option cannot be used; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Target:
    """One Python/architecture pair the wheelhouse must install on."""

    name: str
    python: str
    platforms: tuple[str, ...]

    @property
    def requirement(self) -> str:
        return "feedback-edge"


_AARCH64 = ("manylinux_2_28_aarch64", "manylinux2014_aarch64", "linux_aarch64")
_ARMV7 = ("linux_armv7l",)
PI_TARGETS = (
    Target("bookworm-arm64", "3.11", _AARCH64),
    Target("trixie-arm64", "3.13", _AARCH64),
    Target("bookworm-armhf", "3.11", _ARMV7),
    Target("trixie-armhf", "3.13", _ARMV7),
)


def host_target() -> Target:
    """This machine's interpreter and architecture (tests install the wheelhouse here)."""
    machine = os.uname().machine
    return Target(f"host-{machine}", f"{sys.version_info.major}.{sys.version_info.minor}",
                  (f"manylinux_2_28_{machine}", f"manylinux2014_{machine}",
                   f"manylinux_2_17_{machine}", f"linux_{machine}"))


@dataclass(frozen=True, slots=True)
class Options:
    bootfs: Path
    config: Path
    wifi_ssid: str | None = None
    wifi_psk_file: Path | None = None
    wifi_country: str | None = None
    ssh_key: Path | None = None
    admin_user: str = "admin"
    hostname: str | None = None
    os: str = "auto"
    wheelhouse: Path | None = None
    targets: tuple[Target, ...] = PI_TARGETS


# -- the card -----------------------------------------------------------------

def detect_os(bootfs: Path, wanted: str = "auto") -> str:
    """'bookworm' or 'trixie'; refuses anything that is not a Pi boot partition."""
    if not bootfs.is_dir():
        raise ProvisionError(f"{bootfs} is not a directory: give the mount point of the "
                             "card's boot partition (the small FAT one, named bootfs)")
    missing = [n for n in ("config.txt", "cmdline.txt") if not (bootfs / n).is_file()]
    has_firmware = any(bootfs.glob("bcm27*.dtb")) or any(bootfs.glob("kernel*.img"))
    if missing or not has_firmware:
        what = ", ".join(missing) if missing else "bcm27*.dtb or kernel*.img"
        raise ProvisionError(f"{bootfs} is not a Raspberry Pi OS boot partition (no {what}); "
                             "flash Raspberry Pi OS Lite first and give the mount point of "
                             "its boot partition (bootfs)")
    if wanted != "auto":
        return wanted
    seeded = (bootfs / "meta-data").exists() or (bootfs / "user-data").exists()
    return "trixie" if seeded else "bookworm"


# -- the site folder ------------------------------------------------------------

def _nested(data: dict[str, object], keys: Sequence[str]) -> object:
    node: object = data
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def site_files(config_path: Path) -> tuple[Config, dict[str, Path]]:
    """Validate the config as the Pi will read it; return it and the files it names."""
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        raise ProvisionError(f"the config does not validate: {e}") from None
    data = tomllib.loads(config_path.read_text(encoding="utf-8"))
    files: dict[str, Path] = {}
    for keys in FILE_KEYS:
        value = _nested(data, keys)
        if not isinstance(value, str):
            continue
        rel = Path(value)
        if rel.is_absolute() or ".." in rel.parts:
            raise ProvisionError(
                f"{'.'.join(keys)} = {value!r}: for provisioning, name the file relative to "
                f"edge.toml (e.g. {rel.name!r}) and put it next to edge.toml; it is "
                "installed beside edge.toml in /etc/feedback-edge on the Pi")
        src = config_path.parent / rel
        if not src.is_file():
            raise ProvisionError(f"the config names {rel}, which is not next to "
                                 f"{config_path.name} ({src})")
        files[rel.as_posix()] = src
    if not cfg.store.path.is_absolute() or not cfg.store.path.is_relative_to(STATE_DIR):
        raise ProvisionError(f"[store] path = {str(cfg.store.path)!r}: on the Pi the service "
                             f"may write only under {STATE_DIR}; leave it out for the default")
    return cfg, files


# -- the wheelhouse ------------------------------------------------------------------

def _pip(args: Sequence[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check",
                           *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ProvisionError(f"pip {args[0]} failed: {' / '.join(tail)}")


def _platform_args(t: Target) -> list[str]:
    args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", t.python]
    for p in t.platforms:
        args += ["--platform", p]
    return args


def build_wheelhouse(dest: Path, targets: Iterable[Target] = PI_TARGETS,
                     project: Path = PROJECT) -> None:
    """Build the daemon's wheel and download every dependency for each target."""
    if not (project / "pyproject.toml").is_file():
        raise ProvisionError(f"{project} is not the project's source tree: build the "
                             "wheelhouse from a checkout, or pass --wheelhouse DIR")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # From a clean copy: setuptools' in-tree build/ keeps files that were
        # deleted from the source, and they would ship.
        src = Path(tmp) / "src"
        shutil.copytree(project, src, ignore=shutil.ignore_patterns(
            ".venv", "build", "dist", ".git", "*.egg-info", "__pycache__", ".*_cache",
            ".hypothesis", "demo-run"))
        _pip(["wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), str(src)])
    own = sorted(dest.glob("feedback_edge-*.whl"))[-1]
    for t in targets:
        _pip(["download", "--quiet", "--dest", str(dest), *_platform_args(t), str(own), "pip"])
    check_wheelhouse(dest, targets)


def check_wheelhouse(dest: Path, targets: Iterable[Target] = PI_TARGETS) -> None:
    """Resolve each target offline from `dest` alone, as the Pi's first boot will."""
    if not any(dest.glob("feedback_edge-*.whl")) or not any(dest.glob("pip-*.whl")):
        raise ProvisionError(f"{dest} is not a wheelhouse (no feedback_edge or pip wheel); "
                             "make one with `feedback-edge wheelhouse DIR`")
    with tempfile.TemporaryDirectory() as scratch:
        for t in targets:
            try:
                _pip(["install", "--dry-run", "--quiet", "--ignore-installed", "--no-index",
                      "--find-links", str(dest), "--target", scratch, *_platform_args(t),
                      t.requirement, "pip"])
            except ProvisionError as e:
                raise ProvisionError(f"the wheelhouse {dest} cannot install on {t.name} "
                                     f"(Python {t.python}): {e}") from None


# -- first-boot files -------------------------------------------------------------------

def _yaml(value: object, indent: int = 0) -> str:
    """Block-style YAML for dicts, lists and scalars.  Scalars are JSON-quoted:
    JSON strings are valid YAML double-quoted strings, so no value (an SSID
    with ': ' or '#') can change the document's structure."""
    pad = " " * indent
    if not isinstance(value, dict | list) or not value:
        return json.dumps(value)  # a scalar, or an empty collection in flow style: {} or []
    lines = []
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, dict | list) and v:
                lines.append(f"{pad}{json.dumps(str(k))}:\n{_yaml(v, indent + 2)}")
            else:
                lines.append(f"{pad}{json.dumps(str(k))}: {_yaml(v)}")
    else:
        for item in value:
            body = _yaml(item, indent + 2)
            lines.append(f"{pad}- {body.lstrip()}" if isinstance(item, dict | list)
                         else f"{pad}- {body}")
    return "\n".join(lines)


def user_data(hostname: str, admin: str | None, keys: Sequence[str]) -> str:
    doc: dict[str, object] = {"hostname": hostname, "manage_etc_hosts": True,
                              "ssh_pwauth": False, "disable_root": True}
    runcmd: list[object] = []
    if admin is not None and keys:
        doc["users"] = [{"name": admin, "groups": "sudo,adm", "shell": "/bin/bash",
                         "lock_passwd": True, "sudo": "ALL=(ALL) NOPASSWD:ALL",
                         "ssh_authorized_keys": list(keys)}]
        runcmd.append(["systemctl", "enable", "--now", "ssh"])
    runcmd.append(["sh", "-c", f"sh {PI_BOOT}/{BUNDLE}/install.sh "
                   f"> {PI_BOOT}/{BUNDLE}/install.log 2>&1"])
    doc["runcmd"] = runcmd
    return "#cloud-config\n# Written by feedback-edge provision.\n" + _yaml(doc) + "\n"


def meta_data(hostname: str) -> str:
    # A fresh instance-id makes cloud-init treat this card as a new instance.
    return _yaml({"instance-id": f"feedback-{hostname}-{uuid.uuid4().hex[:12]}",
                  "local-hostname": hostname}) + "\n"


def network_config(ssid: str | None, psk: str | None, country: str | None) -> str:
    net: dict[str, object] = {"version": 2,
                              "ethernets": {"eth0": {"dhcp4": True, "optional": True}}}
    if ssid is not None:
        wlan: dict[str, object] = {"dhcp4": True, "optional": True,
                                   "access-points": {ssid: {"password": psk}}}
        if country is not None:
            wlan["regulatory-domain"] = country
        net["wifis"] = {"wlan0": wlan}
    return "# Written by feedback-edge provision.\n" + _yaml({"network": net}) + "\n"


def _keyfile_escape(value: str) -> str:
    # GKeyFile string escapes (NetworkManager keyfiles).
    out = value.replace("\\", "\\\\")
    return "\\s" + out[1:] if out.startswith(" ") else out


def nm_keyfile(ssid: str, psk: str) -> str:
    return "\n".join([
        "[connection]", "id=feedback-wifi", f"uuid={uuid.uuid4()}", "type=wifi",
        "autoconnect=true", "", "[wifi]", "mode=infrastructure", f"ssid={_keyfile_escape(ssid)}",
        "", "[wifi-security]", "key-mgmt=wpa-psk", f"psk={_keyfile_escape(psk)}", "",
        "[ipv4]", "method=auto", "", "[ipv6]", "addr-gen-mode=default", "method=auto", ""])


def _read_option_file(flag: str, path: Path) -> str:
    """The text of a file an option names; ProvisionError naming the option if unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProvisionError(f"{flag} {path}: cannot read it ({e})") from None


def _read_wifi(opts: Options) -> tuple[str | None, str | None]:
    if opts.wifi_ssid is None:
        if opts.wifi_psk_file is not None:
            raise ProvisionError("--wifi-psk-file needs --wifi SSID")
        return None, None
    ssid = opts.wifi_ssid
    if not 1 <= len(ssid.encode()) <= 32 or any(ord(c) < 32 for c in ssid):
        raise ProvisionError("--wifi: an SSID is 1 to 32 bytes without control characters")
    if opts.wifi_psk_file is None:
        raise ProvisionError("--wifi needs --wifi-psk-file FILE (a file holding the "
                             "passphrase; secrets are not taken on the command line)")
    if opts.wifi_country is None or not COUNTRY_RE.match(opts.wifi_country):
        raise ProvisionError("--wifi needs --wifi-country CC, the two-letter country code "
                             "(e.g. DE): a Pi's Wi-Fi stays off until it is set")
    psk = _read_option_file("--wifi-psk-file", opts.wifi_psk_file).rstrip("\r\n")
    hex_key = len(psk) == 64 and all(c in "0123456789abcdefABCDEF" for c in psk)
    if not hex_key and not (8 <= len(psk) <= 63 and all(32 <= ord(c) < 127 for c in psk)):
        raise ProvisionError(f"--wifi-psk-file {opts.wifi_psk_file}: a WPA passphrase is 8 "
                             "to 63 printable ASCII characters (or 64 hex digits)")
    return ssid, psk


def _read_keys(opts: Options) -> list[str]:
    if opts.ssh_key is None:
        return []
    text = _read_option_file("--ssh-key", opts.ssh_key)
    if "PRIVATE KEY" in text:
        raise ProvisionError(f"--ssh-key {opts.ssh_key} is a private key: give the public "
                             "one (the .pub file), and keep the private key off the card")
    keys = [ln.strip() for ln in text.splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]
    if not keys or not all(re.match(r"^(ssh-|ecdsa-|sk-)\S+ \S+", k) for k in keys):
        raise ProvisionError(f"--ssh-key {opts.ssh_key}: not an OpenSSH public key "
                             "(expected lines like 'ssh-ed25519 AAAA... name')")
    return keys


# -- putting it together ---------------------------------------------------------------

def provision(opts: Options) -> list[str]:
    """Write everything onto the card.  Checks everything before writing anything."""
    os_name = detect_os(opts.bootfs, opts.os)
    cfg, files = site_files(opts.config)
    ssid, psk = _read_wifi(opts)
    keys = _read_keys(opts)
    if not USER_RE.match(opts.admin_user):
        raise ProvisionError(f"--admin-user {opts.admin_user!r}: 1 to 32 lower-case letters, "
                             "digits, '-' or '_'")
    hostname = opts.hostname or f"{cfg.site}-{cfg.edge}"[:63].strip("-")
    if not HOSTNAME_RE.match(hostname):
        raise ProvisionError(f"--hostname {hostname!r}: 1 to 63 lower-case letters, digits "
                             "or '-', not starting or ending with '-'")

    bundle = opts.bootfs / BUNDLE
    with tempfile.TemporaryDirectory() as tmp:
        wheels = opts.wheelhouse
        if wheels is None:
            wheels = Path(tmp) / "wheels"
            build_wheelhouse(wheels, opts.targets)
        else:
            check_wheelhouse(wheels, opts.targets)
        need = sum(p.stat().st_size for p in wheels.glob("*.whl")) + (1 << 20)
        free = shutil.disk_usage(opts.bootfs).free
        if free < need:
            raise ProvisionError(f"{opts.bootfs} has {free >> 20} MiB free; the bundle needs "
                                 f"{need >> 20} MiB")
        _write_bundle(bundle, opts.config, cfg, files, wheels)

    done = [f"{opts.bootfs}: Raspberry Pi OS {os_name.capitalize()} boot partition",
            f"  {BUNDLE}/: installer, site config ({1 + len(files)} file(s)), unit files, "
            f"{len(list((bundle / 'wheels').glob('*.whl')))} wheels for "
            + ", ".join(t.name for t in opts.targets)]
    if os_name == "trixie":
        (opts.bootfs / "user-data").write_text(
            user_data(hostname, opts.admin_user if keys else None, keys), encoding="utf-8")
        (opts.bootfs / "meta-data").write_text(meta_data(hostname), encoding="utf-8")
        (opts.bootfs / "network-config").write_text(network_config(ssid, psk, opts.wifi_country),
                                                    encoding="utf-8")
        done.append("  cloud-init: user-data, meta-data, network-config")
    else:
        _write_bookworm(opts, bundle, hostname, keys, ssid=ssid, psk=psk)
        done.append("  cmdline.txt: first boot runs feedback/firstrun.sh, then reboots")
    done.append(f"  hostname {hostname}"
                + (f", ssh for {opts.admin_user} (keys only)" if keys else ", no ssh login")
                + (f", Wi-Fi {ssid!r} ({opts.wifi_country})" if ssid else ", Ethernet only"))
    return done


def _write_bundle(bundle: Path, config: Path, cfg: Config, files: dict[str, Path],
                  wheels: Path) -> None:
    if bundle.exists():
        shutil.rmtree(bundle)
    (bundle / "site").mkdir(parents=True)
    shutil.copyfile(config, bundle / "site" / "edge.toml")
    for rel, src in files.items():
        (bundle / "site" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, bundle / "site" / rel)
    system = bundle / "system"
    system.mkdir()
    for name in ("feedback-edge.service", "feedback-edge.sysusers", "70-feedback-edge.rules"):
        shutil.copyfile(PROJECT / "systemd" / name, system / name)
    (system / "71-feedback-edge-site.rules").write_text(udev_rules(cfg), encoding="utf-8")
    for name in ("install.sh", "firstrun.sh"):
        shutil.copyfile(PROJECT / "systemd" / "firstboot" / name, bundle / name)
    shutil.copytree(wheels, bundle / "wheels")


def _write_bookworm(opts: Options, bundle: Path, hostname: str, keys: list[str], *,
                    ssid: str | None, psk: str | None) -> None:
    (bundle / "hostname").write_text(hostname + "\n", encoding="utf-8")
    if keys:
        (bundle / "authorized_keys").write_text("\n".join(keys) + "\n", encoding="utf-8")
        (bundle / "admin-user").write_text(opts.admin_user + "\n", encoding="utf-8")
    if ssid is not None and psk is not None:
        (bundle / "wifi.nmconnection").write_text(nm_keyfile(ssid, psk), encoding="utf-8")
        (bundle / "wifi-country").write_text(f"{opts.wifi_country}\n", encoding="utf-8")
    cmdline = opts.bootfs / "cmdline.txt"
    line = cmdline.read_text(encoding="utf-8").strip().replace(" " + FIRSTRUN_ARGS, "")
    # cmdline.txt must stay one line: the firmware reads only the first.
    cmdline.write_text(f"{line} {FIRSTRUN_ARGS}\n", encoding="utf-8")
