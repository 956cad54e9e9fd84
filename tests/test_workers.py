"""Query blocks on one single-threaded worker per core while the CPU is busy: the same outputs, bit for bit, as in
order on one thread, and the run-queue delay that says when."""

import os
import threading
import warnings

import pytest
import torch

from selfextend.attention import blockwise, workers
from test_kernels import make_problem, make_rotation

several_cores = pytest.mark.skipif(min(torch.get_num_threads(), len(os.sched_getaffinity(0))) < 2,
                                   reason="workers run only where torch has several threads and cores")


def _in_order(monkeypatch):
    monkeypatch.setattr(workers, "workers_for", lambda like: 1)


@pytest.fixture
def busy(monkeypatch):
    """The machine seen as busy: another process holds a core."""
    monkeypatch.setattr(workers.contention, "look", lambda: True)


@several_cores
@pytest.mark.parametrize("block", [8, None])  # five blocks of two sub-blocks; one block (a prefill chunk's call)
@pytest.mark.parametrize("pads", [[0], [0, 5]])
def test_selfextend_and_local_blocks_on_workers_equal_them_in_order(monkeypatch, busy, pads, block):
    """Blocks, and a block's sub-blocks, on the workers: each sub-block on one, single-threaded."""
    _, _, v, q, k, geometry = make_problem(40, 52, pads=pads)
    rotation, calls = make_rotation(3, 6), []
    original = blockwise._attend_block
    monkeypatch.setattr(blockwise, "_attend_block", lambda *a, **kw: (
        calls.append((threading.current_thread().name, torch.get_num_threads(), len(a) > 11)), original(*a, **kw))[1])

    def run() -> list[tuple]:
        calls.clear()
        outputs = (blockwise.selfextend_attention(q, k, v, geometry, rotation, 0.25, block=block),
                   blockwise.local_attention(q, k, v, geometry, 7, 0.25, block=block))
        return outputs, [(name, threads) for name, threads, sub_block in calls if sub_block]

    with torch.inference_mode():
        on_workers, sub_blocks = run()
        assert len(sub_blocks) >= 13 and all(name.startswith("selfextend-block") and threads == 1
                                              for name, threads in sub_blocks)
        _in_order(monkeypatch)
        in_order, sub_blocks_in_order = run()
        assert [name for name, _ in sub_blocks_in_order] == [threading.current_thread().name] * len(sub_blocks)
    for got, expected in zip(on_workers, in_order):
        assert torch.equal(got, expected)


@several_cores
def test_workers_keep_this_threads_modes_and_raise_a_tasks_exception(busy):
    seen = []

    def note():
        seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))

    def fail():
        raise ValueError("block 2")

    like = torch.zeros(1)
    with torch.inference_mode():
        workers.run_blocks(note, [()] * 2, like)
    with torch.no_grad():
        workers.run_blocks(note, [()] * 2, like)
    assert seen == [(True, False)] * 2 + [(False, False)] * 2
    with pytest.raises(ValueError, match="block 2"):
        workers.run_blocks(lambda task: task(), [(note,), (fail,), (note,)], like)


def test_autograd_tracing_one_thread_other_devices_and_a_quiet_machine_run_in_order(monkeypatch, busy):
    leaf = torch.zeros(1, requires_grad=True)
    assert workers.workers_for(leaf) == 1  # autograd records each block's graph on this thread
    with torch.no_grad():
        assert workers.workers_for(leaf) == min(torch.get_num_threads(), len(os.sched_getaffinity(0)))
    assert workers.workers_for(torch.zeros(1, device="meta")) == 1
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert workers.workers_for(torch.zeros(1)) == 1
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # a thread bound to one core (vLLM's workers)
    assert workers.workers_for(torch.zeros(1)) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(workers.contention, "look", lambda: False)  # nothing else wants the cores
    assert workers.workers_for(torch.zeros(1)) == 1


def test_a_process_whose_threads_another_places_runs_blocks_in_order(monkeypatch, busy):
    """vLLM's CPU worker binds torch's threads and refuses to change their count: there the workers never run."""
    monkeypatch.setattr(workers, "_threads_placed_by", None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert workers.workers_for(torch.zeros(1)) == 2
    workers.leave_threads_alone("vLLM's CPU worker")
    assert workers.workers_for(torch.zeros(1)) == 1


@several_cores
def test_a_block_task_that_runs_blocks_runs_them_in_order_on_its_own_worker(busy):
    seen = []

    def outer():
        names = []
        workers.run_blocks(lambda: names.append(threading.current_thread().name), [()] * 2, torch.zeros(1))
        seen.append((threading.current_thread().name, names))

    workers.run_blocks(outer, [()] * 2, torch.zeros(1))
    assert len(seen) == 2 and all(name.startswith("selfextend-block") and names == [name] * 2 for name, names in seen)


@several_cores
def test_threads_started_after_the_workers_get_this_threads_count(monkeypatch, busy):
    monkeypatch.setattr(workers, "_pool", None)  # a pool started in this test
    workers.run_blocks(lambda: None, [()] * 2, torch.zeros(1))
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [torch.get_num_threads()] and seen[0] > 1


def test_contention_is_the_run_queue_delay_against_the_time_passed(monkeypatch):
    clock, delay = [100.0], [5_000_000_000]
    monkeypatch.setattr(workers.time, "monotonic", lambda: clock[0])
    seen = workers.Contention(lambda: delay[0])
    assert not seen.look()  # a first look has nothing to compare
    clock[0] += 1.0
    delay[0] += 50_000_000  # 0.05 s waited in 1 s: quiet
    assert not seen.look()
    clock[0] += 2.0
    delay[0] += 1_000_000_000  # 1 s in 2 s: a core held by another process
    assert seen.look()
    clock[0] += 0.001
    assert seen.look()  # too soon after the last look to tell: its answer stands
    clock[0] += 1.0
    assert not seen.look()  # no more delay since the last look that counted
    blind = workers.Contention(lambda: None)
    with pytest.warns(UserWarning, match="cannot see another process competing for the cores"):
        assert not blind.look()  # no statistics on this system: never busy, and said once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not blind.look()


def test_run_queue_delay_sums_the_threads_and_skips_what_it_cannot_read(tmp_path):
    for thread, text in (("1", "900 250 3\n"), ("2", "10 750 1\n"), ("3", "")):
        (tmp_path / thread).mkdir()
        (tmp_path / thread / "schedstat").write_text(text)
    (tmp_path / "4").mkdir()  # a thread that ended while it was read
    assert workers.run_queue_delay(tmp_path) == 1000
    assert workers.run_queue_delay(tmp_path / "none") is None
    assert isinstance(workers.run_queue_delay(), (int, type(None)))


def test_pressure_stall_is_the_some_total_and_the_fallback_chosen_once(tmp_path, monkeypatch):
    pressure = tmp_path / "cpu"
    pressure.write_text("some avg10=0.59 avg60=5.98 avg300=2.51 total=32419248\n"
                        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert workers.pressure_stall(pressure) == 32_419_248_000
    assert workers.pressure_stall(tmp_path / "none") is None
    pressure.write_text("some avg10=0.59\n")
    assert workers.pressure_stall(pressure) is None
    monkeypatch.setattr(workers, "_wait_source", None)  # as in a fresh process
    monkeypatch.setattr(workers, "pressure_stall", lambda: 7)
    monkeypatch.setattr(workers, "run_queue_delay", lambda: None)  # a kernel without schedstat (a Firecracker VM)
    assert workers.waiting_for_cores() == 7
    monkeypatch.setattr(workers, "run_queue_delay", lambda: 3)
    assert workers.waiting_for_cores() == 7  # the source chosen at the first look is kept
    monkeypatch.setattr(workers, "_wait_source", None)
    assert workers.waiting_for_cores() == 3
    monkeypatch.setattr(workers, "pressure_stall", lambda: 9)
    assert workers.waiting_for_cores() == 3


@several_cores
def test_blocks_run_in_order_hand_the_rest_to_the_workers_once_the_process_is_seen_competing(monkeypatch):
    answers = iter([False, False, True])  # a first look has nothing to compare; a competitor seen at the third
    monkeypatch.setattr(workers.contention, "look", lambda: next(answers))
    names = []
    workers.run_blocks(lambda i: names.append((i, threading.current_thread().name)), [(i,) for i in range(5)],
                       torch.zeros(1))
    here = threading.current_thread().name
    assert names[:2] == [(0, here), (1, here)]
    assert sorted(i for i, _ in names[2:]) == [2, 3, 4] and all(n.startswith("selfextend-block") for _, n in names[2:])


def test_a_look_too_soon_after_the_last_reads_nothing(monkeypatch):
    clock, reads = [100.0], []
    monkeypatch.setattr(workers.time, "monotonic", lambda: clock[0])
    seen = workers.Contention(lambda: reads.append(1) or 0)
    for _ in range(5):
        seen.look()
    assert len(reads) == 1
    clock[0] += 1.0
    seen.look()
    assert len(reads) == 2

