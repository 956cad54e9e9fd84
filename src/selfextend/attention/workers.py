"""On a busy CPU, a kernel's independent query blocks run on one single-threaded worker per core.

The blockwise kernels make hundreds of small calls per layer, each split over the cores by OpenMP, which ends
every call at a barrier. With another process holding a core, the thread that finished first spins there while
the other waits to be scheduled: SelfExtend's prefill took 1.5-1.8x vanilla's time where it takes 1.1x on a
quiet machine (docs/results.md, "On a busy machine"). Whole blocks per worker need no barrier: a worker slowed
by a competitor takes fewer blocks. On a quiet machine the workers cost prefill speed (small calls handed to a
thread) and memory (each thread's allocator arena), so they run only while this process's threads are seen
waiting for a core: their run-queue delay (Linux's /proc/self/task/*/schedstat) since the last look is more
than `BUSY` of the time passed. Kernels built without those statistics (seen on a Firecracker VM) may still
keep the machine's CPU pressure (/proc/pressure/cpu: the time some task waited for a core), used instead. Never
under autograd or torch.compile, nor with one core for this thread, nor in a process whose threads someone else
places (`leave_threads_alone`: vLLM's CPU worker binds torch's threads to cores and refuses to change their count).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch

BUSY = 0.1  # run-queue delay per second of wall time from which this process counts as competing for cores
_LOOK_EVERY = 0.01  # seconds: a look sooner than this after the last keeps its answer

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_local = threading.local()
_one_call = threading.Lock()  # one call's blocks at a time: the workers set torch's thread count, process-wide


def run_queue_delay(tasks: Path = Path("/proc/self/task")) -> int | None:
    """Nanoseconds this process's threads have waited, runnable, for a core since they started; None where the
    system does not say (no /proc, or no scheduler statistics)."""
    total, seen = 0, False
    try:
        threads = os.listdir(tasks)
    except OSError:
        return None
    for thread in threads:
        try:
            total += int((tasks / thread / "schedstat").read_text().split()[1])
            seen = True
        except (OSError, IndexError, ValueError):  # a thread that ended meanwhile, or no statistics
            continue
    return total if seen else None


def pressure_stall(pressure: Path = Path("/proc/pressure/cpu")) -> int | None:
    """Nanoseconds during which some task on this machine waited for a core (Linux's pressure stall information,
    its 'some' total); None where the system does not say."""
    try:
        for line in pressure.read_text().splitlines():
            if line.startswith("some "):
                return int(line.rsplit("total=", 1)[1]) * 1000
    except (OSError, IndexError, ValueError):
        pass
    return None


_wait_source: Callable[[], int | None] | None = None  # chosen at the first look, kept for the process


def waiting_for_cores() -> int | None:
    """The wait that says whether this process competes for cores: its threads' run-queue delay where the kernel
    keeps it, else the machine's CPU pressure stall; None where neither is kept. The source is chosen at the first
    look and kept: on a kernel without schedstat, every look would otherwise open each thread's file in vain."""
    global _wait_source
    if _wait_source is None:
        delay = run_queue_delay()
        if delay is not None:
            _wait_source = run_queue_delay
            return delay
        _wait_source = pressure_stall
    return _wait_source()


class Contention:
    """Whether this process competes for cores now: the wait for cores (`waiting_for_cores`: its threads' run-queue
    delay, else the machine's CPU pressure) over the wall time between looks."""

    def __init__(self, delay: Callable[[], int | None] = waiting_for_cores) -> None:
        self._delay = delay
        self._last: tuple[float, int] | None = None
        self.busy = False
        self._blind_said = False

    def look(self) -> bool:
        """Busy or not by the delay since the last look; the last answer stands if that was under `_LOOK_EVERY` ago
        (cheap then: nothing is read, so a call may look again after each of its blocks)."""
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < _LOOK_EVERY:
            return self.busy
        delay = self._delay()
        if delay is None:
            self._last, self.busy = None, False
            if not self._blind_said:
                self._blind_said = True
                warnings.warn("this system keeps neither per-thread scheduler statistics nor CPU pressure "
                              "(/proc/self/task/*/schedstat, /proc/pressure/cpu), so selfextend cannot see another "
                              "process competing for the cores: its prefill kernels stay on OpenMP, up to ~3x "
                              "vanilla's time on a busy machine (docs/results.md)", stacklevel=2)
        elif self._last is None:
            self._last = (now, delay)
        else:
            self.busy = (delay - self._last[1]) / 1e9 > BUSY * (now - self._last[0])
            self._last = (now, delay)
        return self.busy


contention = Contention()
_threads_placed_by: str | None = None  # who places this process's threads, if not torch (then no workers run)


def leave_threads_alone(owner: str) -> None:
    """From now on run every call's blocks in order on the calling thread: `owner` places this process's threads
    and sets their count (vLLM's CPU worker), so the workers, which set it to one each, must not run."""
    global _threads_placed_by
    _threads_placed_by = owner


def threads_placed_by() -> str | None:
    """Who places this process's threads (`leave_threads_alone`), or None: torch, and the workers may run."""
    return _threads_placed_by


def _mark_worker() -> None:
    _local.worker = True


def workers_for(like: torch.Tensor) -> int:
    """How many workers run the blocks of a call on `like`'s tensors now: 1 (run in order here) unless it is a CPU
    call without autograd or tracing, torch uses several threads, this thread may run on that many cores, and
    the process is competing for them."""
    if like.device.type != "cpu" or (torch.is_grad_enabled() and like.requires_grad) \
            or torch.compiler.is_compiling() or getattr(_local, "worker", False) or _threads_placed_by is not None:
        return 1
    count = min(torch.get_num_threads(), len(os.sched_getaffinity(0)))
    return count if count > 1 and contention.look() else 1


def run_blocks(block: Callable[..., None], calls: list[tuple], like: torch.Tensor, growing: bool = False) -> None:
    """`block(*args)` for each args of `calls` (independent: each writes its own rows), on `workers_for(like)`
    workers when that is more than one and there are several calls, else one after another here; an exception
    is raised here. `growing`: the calls are listed by growing cost, so the workers take the last, longest first.
    Blocks run in order look again after each one, and hand the rest to the workers once the process is seen
    competing: a first look has nothing to compare with, and a competitor may start within a call."""
    global _pool, _pool_size
    done, count = 0, workers_for(like) if len(calls) > 1 else 1
    while count == 1 and done < len(calls):
        block(*calls[done])
        done += 1
        if 1 < len(calls) - done:
            count = workers_for(like)  # cheap: a look within 10 ms of the last reads nothing
    if done == len(calls):
        return
    calls = calls[done:]
    with _one_call:
        if _pool is None or _pool_size != count:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(count, "selfextend-block", _mark_worker), count
        inference, threads = torch.is_inference_mode_enabled(), torch.get_num_threads()

        def run(args: tuple) -> None:
            torch.set_num_threads(1)  # torch's parallel calls run inline on this worker
            with torch.inference_mode(inference), torch.no_grad():  # both are per thread in torch
                block(*args)

        futures = [_pool.submit(run, args) for args in (reversed(calls) if growing else calls)]
        wait(futures)  # all of them, so that none still writes after an exception is raised
        torch.set_num_threads(threads)  # the workers' count is torch's for threads started later, and this one's
    for future in futures:
        future.result()
