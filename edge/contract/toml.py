"""Reading TOML tables with errors phrased for the person who wrote the file.

Every mistake is a `ConfigError` naming the key, the value found and what is
allowed.  `Table` remembers which keys were read, so `finish()` can report an
unknown key (with a "did you mean" hint): a misspelt key that is silently
ignored is how a site ends up on the wrong broker.  Both `edge.toml` and the
collector's `collector.toml` are read with it.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Final

__all__ = ["MISSING", "ConfigError", "Missing", "Table"]


class Missing:
    """The type of `MISSING`: a key that is not in the table."""

    def __repr__(self) -> str:
        return "(missing)"


MISSING: Final = Missing()


class ConfigError(ValueError):
    """A mistake in the configuration, phrased for the person who wrote it."""

    def __init__(self, key: str, value: object, allowed: str, source: str = "") -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        self.source = source
        shown = "(missing)" if value is MISSING else repr(value)
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key} = {shown}: {allowed}")


class Table:
    """Reads one TOML table, remembering which keys were used."""

    def __init__(self, data: dict[str, Any], path: str, source: str,
                 base_dir: Path | None = None) -> None:
        self.data = data
        self.path = path
        self.source = source
        # Relative file names are relative to the config file, so one site
        # folder (edge.toml and the files it names) validates on the
        # installer's laptop and works unchanged in /etc/feedback-edge.
        self.base_dir = base_dir
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, value: object, allowed: str) -> ConfigError:
        return ConfigError(self.key(name), value, allowed, self.source)

    def get(self, name: str) -> object:
        self.used.add(name)
        return self.data.get(name, MISSING)

    def string(self, name: str, *, default: str | Missing | None = MISSING,
               pattern: re.Pattern[str] | None = None, allowed: str = "") -> str | None:
        value = self.get(name)
        if value is MISSING:
            if isinstance(default, Missing):
                raise self.error(name, value, f"required; {allowed or 'a string'}")
            return default
        if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
            raise self.error(name, value, allowed or "must be a string")
        return value

    def required_string(self, name: str, *, pattern: re.Pattern[str] | None = None,
                        allowed: str = "") -> str:
        value = self.string(name, pattern=pattern, allowed=allowed)
        assert value is not None  # noqa: S101 - string() raises when a required key is missing
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self.get(name)
        if value is MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(name, value, f"must be an integer from {low} to {high}")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.get(name)
        if value is MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not low <= value <= high:
            raise self.error(name, value, f"must be a number from {low} to {high}")
        return float(value)

    def path_value(self, name: str, *, must_exist: bool = False) -> Path | None:
        value = self.string(name, default=None, allowed="must be a file path (a string)")
        if value is None:
            return None
        if not value:
            raise self.error(name, value, "must be a non-empty file path")
        p = Path(value)
        if self.base_dir is not None and not p.is_absolute():
            p = self.base_dir / p
        if must_exist and not p.is_file():
            raise self.error(name, value, "must name an existing, readable file")
        return p

    def table(self, name: str) -> Table | None:
        value = self.get(name)
        if value is MISSING:
            return None
        if not isinstance(value, dict):
            raise self.error(name, value, "must be a table ([" + self.key(name) + "])")
        return Table(value, self.key(name), self.source, self.base_dir)

    def secret_file(self, name: str) -> str | None:
        """A file holding one secret (a password, a token): its one line, stripped.

        Raises ConfigError (never showing the content) when it cannot be read, is
        not UTF-8, is empty, or holds more than one line.
        """
        path = self.path_value(name, must_exist=True)
        if path is None:
            return None
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise self.error(name, str(path), "must be UTF-8 text") from None
        except OSError as e:
            raise self.error(name, str(path), f"cannot be read: {e.strerror}") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise self.error(name, str(path), "is empty: the file must hold the secret")
        if len(lines) > 1:
            raise self.error(name, str(path), "must hold only the secret, on one line")
        return lines[0].strip()

    def finish(self) -> None:
        for name in self.data:
            if name not in self.used:
                hint = difflib.get_close_matches(name, sorted(self.used), n=1)
                allowed = f"unknown key; did you mean {hint[0]!r}?" if hint else \
                    f"unknown key; allowed here: {', '.join(sorted(self.used))}"
                raise self.error(name, self.data[name], allowed)
