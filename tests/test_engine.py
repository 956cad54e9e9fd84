"""The server's engine without HTTP: prefix reuse is bit-exact (also with sliding-window layers),
a cancelled request stops within one chunk, the queue is bounded, stop strings are cut."""

from __future__ import annotations

import asyncio

import pytest
import torch

pytest.importorskip("fastapi")

from conftest import make_model  # noqa: E402
from selfextend import apply  # noqa: E402
from selfextend.inference import answer, prefill  # noqa: E402
from selfextend.planning import InputTooLongError  # noqa: E402
from selfextend.serving.engine import Cancelled, Engine, Job, Params, QueueFullError, request_planner  # noqa: E402
from selfextend.serving.metrics import Metrics  # noqa: E402
from selfextend.serving.prefix_cache import PrefixCache, Recorder, restore  # noqa: E402
from selfextend.serving.text import Detokenizer  # noqa: E402

CHUNK = 16


class CharTokenizer:
    """Token t is chr(ord('a') + t); 0 is a special token that decodes to nothing."""

    pad_token_id, eos_token_id = 0, 1

    def decode(self, tokens, skip_special_tokens=True):
        return "".join("" if t == 0 else chr(ord("a") + t) for t in tokens)


def _ids(seed: int, n: int, vocab: int = 97) -> torch.Tensor:
    return torch.randint(2, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _layer_tensors(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_resumed_prefill_is_bit_exact(family):
    """A prompt that shares a prefix with an earlier one, resumed from the kept entry, ends in exactly the
    cache a prefill from scratch gives: every layer, sliding ones included (gemma3's window is 12 < CHUNK)."""
    model = apply(make_model(family), 4, 8)
    first = _ids(0, 150)
    second = torch.cat([first[:, :100], _ids(1, 60)], dim=1)
    settings = (4, 8, None)
    store = PrefixCache(1 << 30)
    recorder = Recorder(settings, first[0, :-1], CHUNK)
    store.add(recorder.finish(prefill(model, first, CHUNK, on_chunk=recorder.record)))

    entry, reused = store.find(settings, second[0, :-1])
    assert reused == 96  # the last chunk boundary inside the 100 shared tokens
    assert store.find((4, 16, None), second[0, :-1]) == (None, 0)  # other settings: other keys and values
    resumed = prefill(model, second, CHUNK, cache=restore(entry, reused, model.config))
    scratch = prefill(model, second, CHUNK)
    for (k1, v1), (k2, v2) in zip(_layer_tensors(resumed), _layer_tensors(scratch)):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    if family == "gemma3":
        assert any(layer.is_sliding for layer in resumed.layers)
        assert resumed.layers[0].cumulative_length == scratch.layers[0].cumulative_length == 159


def test_prefix_cache_is_bounded_and_drops_redundant_entries():
    model = apply(make_model("llama"), 4, 8)
    settings = (4, 8, None)

    def entry(ids):
        recorder = Recorder(settings, ids[0, :-1], CHUNK)
        return recorder.finish(prefill(model, ids, CHUNK, on_chunk=recorder.record))

    a, b = entry(_ids(0, 100)), entry(_ids(1, 100))
    store = PrefixCache(a.nbytes + b.nbytes - 1)  # room for one of them only
    assert store.add(a) and store.add(b)
    assert len(store) == 1 and store.find(settings, a.tokens) == (None, 0)
    assert store.nbytes <= store.capacity_bytes
    longer = entry(torch.cat([_ids(1, 100)[:, :-1], _ids(2, 40)], dim=1))
    store = PrefixCache(1 << 30)
    store.add(b)
    store.add(longer)  # b's tokens are a prefix of longer's: b is redundant
    assert len(store) == 1
    assert not PrefixCache(10).add(a)  # alone past the capacity: not kept


def _engine(model, tokenizer=None, **kwargs) -> Engine:
    return Engine(model, tokenizer or CharTokenizer(), request_planner(model, group_size=4, window_size=8), Metrics(),
                  chunk_size=CHUNK, **kwargs)


def _drain(loop: asyncio.AbstractEventLoop, job: Job) -> list:
    loop.run_until_complete(asyncio.sleep(0))
    events = []
    while not job.events.empty():
        events.append(job.events.get_nowait())
    return events


def test_cancelled_request_stops_within_one_chunk():
    model = make_model("llama")
    engine = _engine(model)
    loop = asyncio.new_event_loop()
    job = Job(Params(_ids(3, 200), 4, engine.planner.plan(204), temperature=0), loop)
    calls = []

    def leave(*_):  # the client leaves while the first chunk is being read
        calls.append(1)
        job.cancelled.set()

    handle = model.register_forward_hook(leave)
    try:
        with pytest.raises(Cancelled):
            engine._run(job)
    finally:
        handle.remove()
        loop.close()
    assert len(calls) == 1  # 12 chunks to read; stopped after the one in progress


def test_engine_answers_like_generate_and_reuses_its_prefix():
    model = make_model("gemma3")
    engine = _engine(model)
    loop = asyncio.new_event_loop()
    ids = _ids(4, 120)
    results, texts = [], []
    for _ in range(2):
        job = Job(Params(ids, 6, engine.planner.plan(126), temperature=0), loop)
        results.append(engine._run(job))
        texts.append("".join(payload for kind, payload in _drain(loop, job) if kind == "delta"))
    loop.close()
    expected = answer(model, ids, prefill(model, ids, CHUNK), 6, 0)
    assert results[0].cached_tokens == 0 and results[1].cached_tokens == 112
    assert results[0].completion_tokens == results[1].completion_tokens == len(expected)
    assert texts[0] == texts[1] == CharTokenizer().decode(expected.tolist())
    assert engine.metrics.prefix_hits._value.get() == 1


def test_full_queue_refuses():
    engine = _engine(make_model("llama"), max_queue=2)  # the worker is not started: nothing leaves the queue
    loop = asyncio.new_event_loop()
    params = Params(_ids(5, 10), 2, engine.planner.plan(12))
    engine.submit(Job(params, loop))
    engine.submit(Job(params, loop))
    with pytest.raises(QueueFullError):
        engine.submit(Job(params, loop))
    assert engine.retry_after() >= 1
    loop.close()


def test_detokenizer_cuts_at_stop_and_never_sends_part_of_it():
    text = Detokenizer(CharTokenizer(), stop=("cde", "zz"))
    sent = "".join(text.push(t) for t in [0, 1, 2, 3, 4, 5])  # "bcdef": stops inside at "cde"
    assert text.stopped and sent + text.finish() == "b"
    text = Detokenizer(CharTokenizer(), stop=("xy",))
    deltas = [text.push(t) for t in [1, 2, 23]]  # "bcx": the "x" may start "xy", held back
    assert "".join(deltas) == "bc" and not text.stopped
    assert text.finish() == "x"
    plain = Detokenizer(CharTokenizer())
    assert [plain.push(t) for t in [1, 2]] == ["b", "c"]


def test_fixed_settings_refuse_past_their_limit():
    planner = request_planner(make_model("llama"), group_size=4, window_size=8)  # L = 64: (64 - 8)·4 + 8 = 232
    assert planner.limit == 232 and planner.plan(232).group_size == 4
    with pytest.raises(InputTooLongError, match="232"):
        planner.plan(233)
    with pytest.raises(ValueError):
        request_planner(make_model("llama"), group_size=4)


def test_string_requests_and_their_prefix_entries_are_their_own():
    model = make_model("gemma3")
    planner = request_planner(model, method="string")
    assert planner.limit == 64
    with pytest.raises(InputTooLongError, match="STRING"):
        planner.plan(65)
    engine = Engine(model, CharTokenizer(), planner, Metrics(), chunk_size=CHUNK)
    loop = asyncio.new_event_loop()
    ids = _ids(6, 50)
    job = Job(Params(ids, 4, planner.plan(54), temperature=0), loop)
    engine._run(job)
    assert model.config.selfextend["method"] == "string"
    expected = answer(model, ids, prefill(model, ids, CHUNK), 4, 0)
    assert "".join(p for k, p in _drain(loop, job) if k == "delta") == CharTokenizer().decode(expected.tolist())
    selfextend_planner = request_planner(model, group_size=4, window_size=8)
    assert engine.prefix.find(("selfextend", 4, 8, None, None), ids[0, :-1]) == (None, 0)
    assert engine.prefix.find(("string", 1, 21, None, 10), ids[0, :-1])[1] == 48
    with pytest.raises(ValueError):
        request_planner(model, group_size=4, window_size=8, method="string")
    with pytest.raises(ValueError, match="STRING's settings"):
        request_planner(model, shifted_offset=20)
    with pytest.raises(ValueError, match="smaller than shifted_offset"):
        request_planner(model, method="string", shifted_offset=20, local_window=20)
    assert request_planner(model, method="string", shifted_offset=30, local_window=3).plan(40).window_size == 30
    assert selfextend_planner.plan(54).method == "selfextend"
    loop.close()


def test_the_engine_rotates_each_key_once(rotated_keys):
    """`serve` keeps grouped keys: no prefill chunk rotates more keys than it adds, each decode step one per layer."""
    model = make_model("llama")
    engine = _engine(model)
    loop = asyncio.new_event_loop()
    engine._run(Job(Params(_ids(7, 120), 6, engine.planner.plan(126), temperature=0), loop))
    loop.close()
    layers = model.config.num_hidden_layers
    assert max(rotated_keys) <= CHUNK
    assert rotated_keys[-5 * layers:] == [1] * 5 * layers
