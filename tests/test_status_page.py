"""The installer's status page: served by the daemon, no personal data, and a
press made on the simulator shows up in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Broker, Proc, free_port, wait_for
from tests.test_pipeline import Site

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def served(tmp_path: Path, broker: Broker,
           procs: Callable[[list[str], Path], Proc]) -> tuple[Site, int]:
    site = Site(tmp_path, broker, procs)
    port = free_port()
    site.config.write_text(site.config.read_text() + f'[web]\nlisten = "127.0.0.1:{port}"\n')
    site.start()
    site.wait_connected()
    return site, port


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - localhost
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), b""


def test_the_api_shows_devices_desks_and_the_last_presses(served: tuple[Site, int]) -> None:
    site, port = served
    site.press(2)
    st = wait_for(lambda: (s := json.loads(_get(f"http://127.0.0.1:{port}/api/status")[1]))
                  and s["recent"] and s, 10, "the press in the API")
    assert st["recent"][0]["what"] == "bad"
    assert st["recent"][0]["desk"] == "desk-1"
    assert st["devices"][0]["state"] == "connected"
    status, page = _get(f"http://127.0.0.1:{port}/")
    assert status == 200
    assert b"Last presses" in page
    assert _get(f"http://127.0.0.1:{port}/nope")[0] == 404


def test_a_lan_page_needs_its_token(tmp_path: Path) -> None:
    from edge.web import StatusPage

    with pytest.raises(ValueError, match="token"):
        StatusPage("0.0.0.0", 0, lambda box, req: None)  # noqa: S104 - the refusal under test
    page = StatusPage("127.0.0.1", 0, lambda box, req: box.put({"ok": True}), token="s3cr3t")
    page.start()
    try:
        assert _get(f"http://127.0.0.1:{page.port}/api/status")[0] == 403
        assert _get(f"http://127.0.0.1:{page.port}/api/status?token=wrong")[0] == 403
        ok, body = _get(f"http://127.0.0.1:{page.port}/api/status?token=s3cr3t")
        assert (ok, json.loads(body)) == (200, {"ok": True})
    finally:
        page.stop()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                    "(scripts/test installs it when run as root)")
def test_a_press_shows_up_in_headless_chromium(served: tuple[Site, int], tmp_path: Path) -> None:
    site, port = served
    site.press(0)
    wait_for(lambda: json.loads(_get(f"http://127.0.0.1:{port}/api/status")[1])["recent"], 10,
             "the press")
    assert CHROMIUM is not None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
             "--virtual-time-budget=3000", "--window-size=1100,900"]
    url = f"http://127.0.0.1:{port}/"
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True,
                         text=True, timeout=90, check=True).stdout
    assert "fc3-00a1b2c3d4e0" in dom
    assert "<span>good </span>" in dom
    assert '<span id="broker" class="ok">connected</span>' in dom
    assert '<div id="verdict" class="ok">All good</div>' in dom
    # One time format, in the site's zone (UTC here), for every time on the page.
    assert re.search(r"<td>20\d\d-\d\d-\d\d \d\d:\d\d:\d\d</td>", dom), dom
    subprocess.run([CHROMIUM, *flags, f"--screenshot={tmp_path / 'page.png'}", url],
                   capture_output=True, timeout=90, check=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000
    # A phone: 390 px wide, nothing wider than the screen.
    phone = [f for f in flags if not f.startswith("--window-size")] + ["--window-size=390,844"]
    dom = subprocess.run([CHROMIUM, *phone, "--dump-dom", url], capture_output=True,
                         text=True, timeout=90, check=True).stdout
    assert 'data-overflow="false"' in dom
    subprocess.run([CHROMIUM, *phone, f"--screenshot={tmp_path / 'phone.png'}", url],
                   capture_output=True, timeout=90, check=True)
    assert (tmp_path / "phone.png").stat().st_size > 10_000
