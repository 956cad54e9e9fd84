"""Running one measurement in a fresh Python process, optionally with an older checkout's selfextend."""

from __future__ import annotations

import json
import os
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
