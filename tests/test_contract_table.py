"""The README's table of field ranges and identifier grammars is the schemas' own."""

from __future__ import annotations

import re
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


def test_side_messages_use_the_same_grammars() -> None:
    """Issue 14: status, timesync, the inventory and health name things with the
    grammars of ids.py, and their times have the event's pattern (the range's years)."""
    from edge.contract.ids import REASON_RE, USB_PORT_ID_RE, USB_PORT_RE, VERSION_RE

    def same(schema_pattern: str, code: re.Pattern[str]) -> None:
        assert schema_pattern.removesuffix("$") + r"\Z" == code.pattern

    event, status, timesync = load_schema("event"), load_schema("status"), \
        load_schema("timesync")
    device = load_schema("devices")["properties"]["devices"]["items"]["properties"]
    health = load_schema("health")["properties"]
    wall = event["properties"]["time"]["properties"]["wall"]["pattern"]
    for schema_pattern, code in [
            (status["properties"]["boot_id"]["pattern"], BOOT_ID_RE),
            (timesync["properties"]["boot_id"]["pattern"], BOOT_ID_RE),
            (status["properties"]["version"]["pattern"], VERSION_RE),
            (device["id"]["anyOf"][0]["pattern"], NAME_RE),
            (device["id"]["anyOf"][1]["pattern"], USB_PORT_ID_RE),
            (device["port_path"]["pattern"], USB_PORT_RE),
            (device["desk"]["pattern"], DESK_RE),
            (device["serial"]["pattern"], USB_SERIAL_RE),
            (device["kind"]["pattern"], REASON_RE),
            (event["properties"]["dropped"]["properties"]["reason"]["pattern"], REASON_RE),
            (event["properties"]["flags"]["items"]["pattern"], REASON_RE),
            (health["drops"]["propertyNames"]["pattern"], REASON_RE),
            (health["decode_errors"]["propertyNames"]["pattern"], NAME_RE),
            (health["decode_errors"]["additionalProperties"]["propertyNames"]["pattern"],
             REASON_RE)]:
        same(schema_pattern, code)
    for schema_pattern in (status["properties"]["since"]["pattern"],
                           timesync["properties"]["wall"]["pattern"],
                           device["last_seen"]["pattern"],
                           load_schema("collector-state")["properties"]["since"]["pattern"]):
        assert schema_pattern == wall
    assert wall.startswith("^(19[6-9][0-9]|20[0-9]{2})-")  # WALL_MIN_MS..WALL_MAX_MS's years
