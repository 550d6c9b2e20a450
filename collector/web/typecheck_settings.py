"""Settings for mypy's Django plugin only: the real settings built from the
example configuration below, since type-checking has no collector.toml."""

import os
import tempfile
from pathlib import Path

_dir = Path(tempfile.gettempdir()) / "feedback-collector-typecheck"
_dir.mkdir(exist_ok=True)
_cfg = _dir / "collector.toml"
_cfg.write_text('id = "typecheck"\n[broker]\nhost = "localhost"\n'
                f'[database]\npath = "{_dir}/feedback.sqlite"\n', encoding="utf-8")
os.environ["FEEDBACK_COLLECTOR_CONFIG"] = str(_cfg)

from collector.web.settings import *  # noqa: E402, F403
