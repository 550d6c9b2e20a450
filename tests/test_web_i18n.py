"""The web app speaks Russian throughout: every string the code and templates
mark for translation is in the Russian catalogue with a translation, and the
compiled catalogue the app loads says the same as the .po file."""

from __future__ import annotations

import gettext
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parent.parent / "collector" / "web"
PO = WEB / "locale" / "ru" / "LC_MESSAGES" / "django.po"
MO = PO.with_suffix(".mo")


def _unquote(chunks: list[str]) -> str:
    text = "".join(chunks)
    return re.sub(r'\\(.)', lambda m: {"n": "\n", "t": "\t"}.get(m[1], m[1]), text)


def parse_po(path: Path) -> dict[str, list[str]]:
    """msgid -> [msgstr] (or the plural forms), the header and fuzzy entries left out."""
    out: dict[str, list[str]] = {}
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        if "#, fuzzy" in block:
            out.setdefault("(fuzzy)", []).append(block)
            continue
        fields: dict[str, list[str]] = {}
        key = ""
        for line in block.splitlines():
            m = re.match(r'^(msgid|msgid_plural|msgstr(?:\[\d\])?) "(.*)"$', line)
            if m:
                key = m[1]
                fields[key] = [m[2]]
            elif line.startswith('"') and key:
                fields[key].append(line[1:-1])
        if "msgid" not in fields:
            continue
        msgid = _unquote(fields["msgid"])
        if not msgid:
            continue
        strs = [_unquote(v) for k, v in sorted(fields.items()) if k.startswith("msgstr")]
        out[msgid] = strs
    return out


def test_every_entry_is_translated_and_none_is_fuzzy() -> None:
    entries = parse_po(PO)
    assert "(fuzzy)" not in entries, entries.get("(fuzzy)")
    untranslated = [k for k, v in entries.items() if not all(v)]
    assert not untranslated, untranslated
    assert len(entries) > 50


def test_the_compiled_catalogue_matches_the_po_file() -> None:
    with MO.open("rb") as f:
        mo = gettext.GNUTranslations(f)
    for msgid, strs in parse_po(PO).items():
        if len(strs) == 1:
            assert mo.gettext(msgid) == strs[0], msgid
        else:
            assert mo.ngettext(msgid, msgid, 5) == strs[2], msgid


@pytest.mark.skipif(shutil.which("xgettext") is None, reason="GNU gettext is not installed "
                    "(scripts/test installs Debian's gettext)")
def test_no_string_marked_for_translation_is_missing_from_the_catalogue(
        tmp_path: Path) -> None:
    """makemessages over a copy of the app: the msgids it finds are the catalogue's."""
    copy = tmp_path / "web"
    shutil.copytree(WEB, copy, ignore=shutil.ignore_patterns("__pycache__", "*.mo"))
    (copy / "locale" / "ru" / "LC_MESSAGES" / "django.po").unlink()
    cfg = tmp_path / "collector.toml"
    cfg.write_text(f'id = "i18n"\n[broker]\nhost = "localhost"\n[database]\n'
                   f'path = "{tmp_path}/feedback.sqlite"\n', encoding="utf-8")
    env = {**os.environ, "FEEDBACK_COLLECTOR_CONFIG": str(cfg),
           "DJANGO_SETTINGS_MODULE": "collector.web.settings"}
    r = subprocess.run([sys.executable, "-m", "django", "makemessages", "-l", "ru",
                        "--no-location"], cwd=copy, env=env, capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    found = set(parse_po(copy / "locale" / "ru" / "LC_MESSAGES" / "django.po"))
    found.discard("(fuzzy)")
    known = set(parse_po(PO))
    assert found - known == set(), f"not in the catalogue: {sorted(found - known)}"
    assert known - found == set(), f"no longer used: {sorted(known - found)}"
