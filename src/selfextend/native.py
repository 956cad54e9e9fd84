"""Compile one of the package's C sources for this machine, once, and load it with ctypes.

The fused kernels are plain C (no Python or torch headers), so a build takes about a second with the system's C
compiler (`$CC`, else `cc`); torch's own extension builder would spend most of a minute on its headers. The
library is kept under $SELFEXTEND_HOME/native (~/.cache/selfextend/native), keyed by the source and the headers it
includes, the compiler and this CPU's flags (it is built for this CPU), and written atomically so that concurrent
processes (vLLM's workers) can build it at once. OpenMP is torch's own runtime (same soname), so threads are shared.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch  # loads the OpenMP runtime our libraries then share

from .errors import NativeBuildError
from .paths import cache_home

FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c11")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _local_headers(source: Path) -> list[Path]:
    """The headers `source` includes by `#include "path"` (relative to it), and theirs: part of what the library
    is built from."""
    found: list[Path] = []
    for name in re.findall(r'^#include "([^"]+)"', source.read_text(), re.M):
        header = (source.parent / name).resolve()
        found += [h for h in (header, *_local_headers(header)) if h not in found]
    return found


@cache
def load(source: Path) -> ctypes.CDLL:
    """The library built from `source` (a .c file), compiled on first use on this machine."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise NativeBuildError(f"no C compiler ({compiler!r}) to build {source.name}: install one (e.g. "
                               f"`apt install gcc`) or set $CC")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    texts = [source.read_text()] + [header.read_text() for header in _local_headers(source)]
    key = hashlib.sha256("\0".join([*texts, compiler, version, _cpu_flags(), *FLAGS,
                                    torch.__version__]).encode()).hexdigest()[:16]
    target = cache_home() / "native" / f"{source.stem}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as folder:
            built = Path(folder) / target.name
            done = subprocess.run([compiler, *FLAGS, "-o", str(built), str(source), "-lm"], capture_output=True,
                                  text=True)
            if done.returncode != 0:
                raise NativeBuildError(f"building {source.name} with {compiler} failed:\n{done.stderr.strip()}")
            os.replace(built, target)  # atomic: a concurrent build of the same key writes the same library
    return ctypes.CDLL(str(target))
