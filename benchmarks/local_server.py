"""What the serving benchmarks share: a free port on 127.0.0.1 and waiting for a started server's /health."""

from __future__ import annotations

import subprocess
from pathlib import Path

from selfextend.serving.local import free_port, wait_until_healthy as _healthy

__all__ = ["free_port", "wait_until_healthy"]


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path, seconds: float) -> None:
    """Wait for `url`/health; stop the benchmark, naming the log, if the server exits or takes longer than
    `seconds`."""
    if not _healthy(url, process, seconds):
        raise SystemExit(f"the server did not start; see {log}")
