"""The README's table of field ranges and identifier grammars is the schemas' own."""

from __future__ import annotations

from pathlib import Path

from edge.contract.ids import BOOT_ID_RE, DESK_RE, DOCTOR_ID_RE, LANG_RE, NAME_RE, USB_SERIAL_RE
from edge.contract.payloads import contract_table, load_schema

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_lists_every_range_and_grammar_of_the_schemas() -> None:
    text = README.read_text("utf-8")
    missing = [row for row in contract_table() if row not in text]
    assert missing == [], "README.md is behind the schemas; regenerate with " \
                          "`python -m edge.contract.payloads`"


def test_the_schemas_ascii_grammars_are_the_code_s() -> None:
    """One grammar per identifier: the schema's pattern (ECMA-262 `$`) is ids.py's (`\\Z`)."""
    event = load_schema("event")
    defs, props = event["$defs"], event["properties"]
    pairs = [(defs["name"]["pattern"], NAME_RE), (defs["desk"]["pattern"], DESK_RE),
             (defs["doctor_id"]["pattern"], DOCTOR_ID_RE),
             (props["device"]["properties"]["serial"]["pattern"], USB_SERIAL_RE),
             (props["time"]["properties"]["boot_id"]["pattern"], BOOT_ID_RE)]
    for schema_pattern, code in pairs:
        assert schema_pattern.removesuffix("$") + r"\Z" == code.pattern
    # LANG_RE groups without capturing; the schema cannot say (?:...) in every dialect.
    assert defs["lang"]["pattern"].replace("(-", "(?:-").removesuffix("$") + r"\Z" == \
        LANG_RE.pattern
