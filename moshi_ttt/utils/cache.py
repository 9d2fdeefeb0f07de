"""moshi-ttt's cache folder (the demo checkpoint, the code cache, the demo's memories), torch-free."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """moshi-ttt's cache: $MOSHI_TTT_CACHE or ~/.cache/moshi_ttt."""
    return Path(os.environ.get("MOSHI_TTT_CACHE") or Path.home() / ".cache" / "moshi_ttt")
