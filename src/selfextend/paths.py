"""Where the project keeps what it builds or converts on this machine: $SELFEXTEND_HOME (~/.cache/selfextend)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """The project's cache folder: converted models, profiles, compiled kernels."""
    return Path(os.environ.get("SELFEXTEND_HOME", Path.home() / ".cache" / "selfextend"))
