"""What both fuzz suites throw (tests/test_collector_fuzz.py at the collector's
intake, tests/test_daemon_fuzz.py at the daemon's commands and devices): hostile
values of every JSON type, and the paths of a document's fields to mutate."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

__all__ = ["field_paths", "hostile_values"]


def hostile_values(ints: list[int], strings: list[str]) -> st.SearchStrategy[Any]:
    """Boundary integers `ints`, any integer, floats with NaN and Infinity (json.dumps
    writes them, which is not JSON), integral floats, text with unpaired surrogates,
    the hostile `strings`, null, booleans, a short list and a small object."""
    return st.one_of(
        st.sampled_from(ints),
        st.integers(),
        st.floats(),
        st.sampled_from([5.0, 1e300, -0.0, 0.5, 2.0**63, 1e19]),
        st.text(st.characters(codec=None), max_size=20),
        st.sampled_from(strings),
        st.none(), st.booleans(),
        st.lists(st.integers(), max_size=2),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    )


def field_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The path (keys and indexes) of every field and item nested in `doc`."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += field_paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += field_paths(v, (*prefix, i))
    return out
