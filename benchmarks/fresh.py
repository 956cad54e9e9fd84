"""Running one measurement in a fresh Python process, optionally with an older checkout's selfextend, and
keeping the machine busy while measuring."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
import subprocess
import sys


def in_fresh_process(script: str, argv: list[str], before: str | None = None) -> dict:
    """Run `python script argv...` and parse the JSON on its last stdout line.

    With `before` (an older checkout), its src/ goes first on PYTHONPATH, so that process imports that
    checkout's selfextend instead of this one's.
    """
    env = dict(os.environ)
    if before:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(before, "src"), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, script, *argv], check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.splitlines()[-1])


@contextmanager
def competing_process(busy: bool = True) -> Iterator[None]:
    """With `busy`, one CPU-bound process (`while True: pass`) runs until the block ends: a busy user's machine."""
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        yield
    finally:
        if competitor is not None:
            competitor.kill()
