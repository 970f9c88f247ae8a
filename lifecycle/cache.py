"""Where the service keeps its files between runs: `TOKEN_STREAMING_CACHE`, else `~/.cache/jina-token-streaming/`.

Apart from engine/loading.py, which imports torch and transformers: the gateway needs the directory (for its
prediction store) without loading either."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TOKEN_STREAMING_CACHE"


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jina-token-streaming"
    return Path(os.environ.get(CACHE_ENV, default))
