"""Lighter weight formats: each layer computes what its stored weights say, and SelfExtend adds no error of its
own on a compressed model (it is compared with the same compressed model, vanilla and the reference oracle)."""

import gc
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import DynamicCache

import selfextend
from selfextend.identity import model_identity
from selfextend.transformers_compat import cache_kwargs
from selfextend import linear_native
from selfextend.allocator import HUGE_PAGE, huge_page_empty
from selfextend.linear_native import NATIVE_TOKENS, QBLOCK, Int8Blocks
from selfextend.sibling_products import group_siblings
from selfextend.weights import CompactEmbedding, PackedLinear, _FilePages, check_format, compress
from conftest import make_model

G, W = 4, 8
FORMATS = ["float16", "int8"]


def _ids(n, seed=1):
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids, **kwargs):
    return model(ids, **kwargs).logits


def test_float16_linear_is_the_half_precision_weight_in_float32_arithmetic():
    torch.manual_seed(0)
    linear, x = nn.Linear(64, 48), torch.randn(3, 5, 64)
    expected = nn.functional.linear(x, linear.weight.half().float(), linear.bias)
    torch.testing.assert_close(PackedLinear(linear, "float16")(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("inputs", [64, 45])  # 45: a last block of 13 inputs
@pytest.mark.parametrize("tokens", [1, 3, 5, NATIVE_TOKENS + 4])  # the C kernel's tiles, and torch's product
def test_int8_linear_is_its_blocks_in_float32_arithmetic(inputs, tokens):
    torch.manual_seed(0)
    linear = nn.Linear(inputs, 50)  # 50 rows: whole tiles of four and a remainder
    x = torch.randn(tokens, inputs) * torch.logspace(-2, 3, tokens)[:, None]
    packed = PackedLinear(linear, "int8")
    blocks = Int8Blocks(packed.rows, packed.scale)
    widened = blocks.widen()
    step = packed.scale.repeat_interleave(QBLOCK, dim=1)[:, :inputs]
    assert ((widened - linear.weight).abs() <= step / 2 + 1e-7).all()  # each weight rounded on its block's scale
    expected = nn.functional.linear(x.double(), widened.double(), linear.bias.double())
    got = packed(x)
    # float32 sums of `inputs` products: the textbook bound, inputs x unit roundoff x sum of |products|
    bound = inputs * torch.finfo(torch.float32).eps * (x.abs().double() @ widened.abs().double().T + 1)
    assert ((got.double() - expected).abs() <= bound).all()
    if tokens <= NATIVE_TOKENS:  # a token's result does not depend on the others in its call
        for row in range(tokens):
            assert torch.equal(packed(x[row:row + 1])[0], got[row])


@pytest.mark.parametrize("inputs", [64, 45])
def test_int8_weights_widen_in_c_to_the_bits_torch_makes_and_long_calls_multiply_those(monkeypatch, inputs):
    torch.manual_seed(0)
    blocks = Int8Blocks.quantize(torch.randn(50, inputs) * torch.logspace(-3, 2, 50)[:, None])
    codes_times_scales = blocks.rows.float() * blocks.scale.float().repeat_interleave(QBLOCK, dim=1)[:, :inputs]
    assert torch.equal(blocks.widen(), codes_times_scales)
    room = torch.full((8, inputs), float("nan"))
    assert torch.equal(blocks.widen(10, 17, room), codes_times_scales[10:17])
    assert room[7].isnan().all()  # only the rows asked for are written
    with pytest.raises(ValueError, match="room"):
        blocks.widen(0, 9, room)
    x = torch.randn(NATIVE_TOKENS + 4, inputs)
    assert torch.equal(linear_native.linear(x, blocks), x @ codes_times_scales.T)  # one product, into the output
    monkeypatch.setattr(linear_native, "WIDEN_BYTES", 4 * inputs * 8)  # slices of 8 rows and a last one of 2
    sliced = torch.cat([x @ codes_times_scales[start:start + 8].T for start in range(0, 50, 8)], dim=1)
    assert torch.equal(linear_native.linear(x, blocks), sliced)


def test_int8_linear_refuses_inputs_it_cannot_take():
    packed = PackedLinear(nn.Linear(64, 8), "int8")
    with pytest.raises(TypeError, match="float32 CPU inputs of 64 features"):
        packed(torch.randn(2, 63))
    with pytest.raises(TypeError, match="float32"):
        packed(torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"bias must be contiguous float32 \[8\]"):
        linear_native.linear(torch.randn(2, 64), Int8Blocks(packed.rows, packed.scale), torch.zeros(7))


def test_int8_blocks_hold_a_q8_0_tensor_exactly():
    """A GGUF's Q8_0 tensor (a float16 scale per 32 weights, codes up to ±127) comes back bit for bit."""
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (6, 4, QBLOCK), generator=generator, dtype=torch.int8)
    codes[:, :, 0] = 127 * torch.randint(0, 2, (6, 4), generator=generator).mul(2).sub(1)  # each block's ±127
    scale = torch.rand(6, 4, 1, generator=generator).mul(0.1).half()
    scale[0, 0] = 0  # a block of zeros
    weight = (codes.float() * scale.float()).view(6, 4 * QBLOCK)
    blocks = Int8Blocks.quantize(weight)
    assert torch.equal(blocks.widen(), weight)


def test_int8_blocks_keep_tiny_weights_finite_and_refuse_ones_past_float16_scales():
    for size in (3e-6, 1e-5):  # the blocks' scales, size / 127, round to float16's smallest (1e-5: codes clip)
        tiny = torch.full((2, QBLOCK), size)
        held = Int8Blocks.quantize(tiny).widen()
        assert held.isfinite().all() and (held - tiny).abs().max() < size / 2
    with pytest.raises(ValueError, match="load these weights dense"):
        Int8Blocks.quantize(torch.full((1, QBLOCK), 1e7))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_embedding_rows_are_the_stored_rows_times_their_scales(family, fmt):
    model = make_model(family)
    original = model.get_input_embeddings()
    ids = torch.arange(original.num_embeddings)[None]
    compact = CompactEmbedding(original, fmt)
    weight, multiplier = original.weight.detach(), float(getattr(original, "embed_scale", 1.0))
    if fmt == "float16":
        stored = weight.half().float()
    else:
        stored = Int8Blocks(compact.rows, compact.scale).widen()
        assert (stored - weight).abs().max() <= compact.scale.max() / 2 + 1e-7
    torch.testing.assert_close(compact(ids)[0], stored * multiplier, atol=0, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_compress_replaces_every_linear_and_keeps_the_dense_identity(fmt):
    dense = make_model("gemma3")
    identity = model_identity(dense)
    model = compress(make_model("gemma3"), fmt)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.get_input_embeddings(), CompactEmbedding)
    assert model_identity(model) == identity
    ids = _ids(40)
    close = {"float16": 5e-3, "int8": 2e-2}[fmt]  # quality, not exactness: the formats' cost on a random model
    assert (_logits(model, ids) - _logits(dense, ids)).abs().max() < close


def test_int8_shares_a_tied_embedding_with_the_lm_head():
    dense = make_model("gemma3")
    dense.get_output_embeddings().weight = dense.get_input_embeddings().weight  # as the real Gemma's
    ids = _ids(40)
    expected = _logits(dense, ids)
    model = compress(dense, "int8")
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.rows.data_ptr() == embedding.rows.data_ptr() and head.scale.data_ptr() == embedding.scale.data_ptr()
    assert (_logits(model, ids) - expected).abs().max() < 2e-2


def _siblings(bias):
    """An attention module's projections in int8, grouped as `compress` groups them: q, k and v read x, o does not.
    Rows not in whole tiles of four, alone or together, so a row's tile differs between the two."""
    torch.manual_seed(0)
    layers = {f"attn.{n}_proj": PackedLinear(nn.Linear(45, rows, bias=bias), "int8")
              for n, rows in (("q", 50), ("k", 15), ("v", 15), ("o", 45))}
    assert group_siblings(layers) == 1
    return types.SimpleNamespace(**{name[5]: layer for name, layer in layers.items()})


def _alone(layer, x):
    return linear_native.linear(x, Int8Blocks(layer.rows.clone(), layer.scale.clone()), layer.bias)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 3, NATIVE_TOKENS + 4])
def test_int8_siblings_on_one_input_are_one_product_of_the_same_bits(monkeypatch, bias, tokens):
    module = _siblings(bias)
    assert module.q.siblings is module.k.siblings is module.v.siblings is not None and module.o.siblings is None
    assert module.q.rows.data_ptr() == module.q.siblings.blocks.rows.data_ptr()  # views: nothing held twice
    x = torch.randn(tokens, 45) * torch.logspace(-2, 3, tokens)[:, None]
    expected = {name: _alone(getattr(module, name), x) for name in "qkv"}
    calls, original = [], linear_native.linear

    def counted(x, blocks, bias=None):
        calls.append(blocks.rows.shape[0])
        return original(x, blocks, bias)

    monkeypatch.setattr(linear_native, "linear", counted)
    rows = {"q": 50, "k": 15, "v": 15}
    for order in ("qkv", "vqk"):
        calls.clear()
        for name in order:
            assert torch.equal(getattr(module, name)(x), expected[name])
        assert calls == ([80] if tokens <= NATIVE_TOKENS else [rows[name] for name in order])


def test_int8_siblings_called_on_different_inputs_are_multiplied_alone_from_then_on():
    module = _siblings(True)
    x, y = torch.randn(1, 45), torch.randn(1, 45)
    assert torch.equal(module.q(x), _alone(module.q, x))
    with pytest.warns(UserWarning, match=r"int8 layers attn\.q_proj, attn\.k_proj, attn\.v_proj .* called them on different inputs"):
        assert torch.equal(module.k(y), _alone(module.k, y))
    assert not module.q.siblings.active
    for name in "qkv":
        assert torch.equal(getattr(module, name)(x), _alone(getattr(module, name), x))


def test_int8_siblings_keep_what_waits_per_thread():
    module = _siblings(False)
    x, y = torch.randn(1, 45), torch.randn(1, 45)
    got = {}

    def other_thread():
        got.update({name: getattr(module, name)(y) for name in "qkv"})

    assert torch.equal(module.q(x), _alone(module.q, x))
    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert torch.equal(module.k(x), _alone(module.k, x)) and torch.equal(module.v(x), _alone(module.v, x))
    assert all(torch.equal(got[name], _alone(getattr(module, name), y)) for name in "qkv")
    assert module.q.siblings.active


def test_int8_siblings_are_grouped_in_a_model_and_decode_the_same_bits():
    model = compress(make_model("gemma3"), "int8")
    groups = {id(m.siblings): m.siblings for m in model.modules() if getattr(m, "siblings", None) is not None}
    names = sorted(name.rpartition(".")[2] for group in groups.values() for name in group.names)
    layers = model.config.num_hidden_layers
    assert len(groups) == 2 * layers and names == sorted(["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"] * layers)
    ids = _ids(30)

    def decode():
        cache = DynamicCache(config=model.config)
        _logits(model, ids[:, :20], **cache_kwargs(model, cache), use_cache=True)
        return torch.cat([_logits(model, ids[:, i:i + 1], **cache_kwargs(model, cache), use_cache=True)
                          for i in range(20, 30)], dim=1)

    calls, original = [], linear_native.linear

    def counted(x, blocks, bias=None):
        calls.append(blocks.rows.shape[0])
        return original(x, blocks, bias)

    fused_rows = {group.blocks.rows.shape[0] for group in groups.values()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(linear_native, "linear", counted)
        together = decode()
    assert all(group.active for group in groups.values())  # the model fed each set one input: never split
    assert sum(rows in fused_rows for rows in calls) == 10 * len(groups)  # each decode step took the shared call
    for group in groups.values():
        group.active = False
    assert torch.equal(decode(), together)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma3"])
def test_selfextend_adds_no_error_of_its_own_on_lighter_weights(family, fmt):
    model = compress(make_model(family), fmt)
    short, long = _ids(W), _ids(200)
    vanilla_short = _logits(model, short)
    selfextend.apply(model, G, W, backend="reference")
    oracle = _logits(model, long)
    selfextend.apply(model, G, W)
    torch.testing.assert_close(_logits(model, short), vanilla_short, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(model, long), oracle, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_chunked_prefill_on_lighter_weights_matches_one_pass(fmt):
    model = selfextend.apply(compress(make_model("gemma3"), fmt), G, W)
    ids = _ids(150)
    cache = DynamicCache(config=model.config)
    chunks = [_logits(model, ids[:, a:a + 37], **cache_kwargs(model, cache), use_cache=True) for a in range(0, 150, 37)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), _logits(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt, device, dtype, match", [
    ("int4", "cpu", "float32", "unknown weight format"),
    ("int8", "cpu", "bfloat16", "float32 compute on CPU"),
    ("float16", "cuda", "float32", "float32 compute on CPU"),
])
def test_formats_that_cannot_work_are_refused(fmt, device, dtype, match):
    with pytest.raises(ValueError, match=match):
        check_format(fmt, device, dtype)
    check_format("dense", "cpu", "bfloat16")


def _mapped_kib(address: int) -> int:
    """Resident KiB of the mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(x, 16) for x in head.split("-"))
            inside = low <= address < high
        elif inside and head == "Rss:":
            return int(line.split()[1])
    raise AssertionError("no mapping holds the address")


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="Linux's /proc")
def test_packing_releases_a_mapped_files_pages_and_nothing_else(tmp_path):
    """Once packed, a weight's pages of a mapped checkpoint leave the process (read again from the file if
    needed); pages written since the load (copied on write) and ordinary memory are never dropped."""
    path = tmp_path / "weights.bin"
    torch.arange(1 << 20, dtype=torch.float32).numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=1 << 20)  # a private map, as checkpoints load
    expected = mapped.clone()
    assert _mapped_kib(mapped.data_ptr()) >= 4000  # read whole: 4 MiB resident
    _FilePages().release(mapped)
    assert _mapped_kib(mapped.data_ptr()) < 100
    assert torch.equal(mapped, expected)  # faulted in again, from the file
    mapped[5] = -1.0  # copied on write: this page is the process's now
    expected[5] = -1.0
    _FilePages().release(mapped)
    assert torch.equal(mapped, expected)
    ordinary = torch.randn(1 << 20)
    kept = ordinary.clone()
    _FilePages().release(ordinary)
    assert torch.equal(ordinary, kept)


def test_compress_releases_each_weights_pages_once_the_identity_has_sampled_it(monkeypatch):
    """The identity's samples fault in pages of every weight (most of a 5 MB matrix); compress hands each
    weight to the page release as soon as it is sampled, so a mapped checkpoint is never resident whole."""
    model = make_model("llama")
    order = []
    sampled = []

    def spy_identity(module, done=None):
        def sampled_then_done(parameter):
            sampled.append(parameter)
            done(parameter)
        return model_identity(module, done=sampled_then_done)

    monkeypatch.setattr("selfextend.weights.model_identity", spy_identity)
    monkeypatch.setattr(_FilePages, "release", lambda self, tensor: order.append(tensor))
    expected = model_identity(model)
    compress(model, "int8")
    weights = [p for _, p in sorted(make_model("llama").named_parameters())]
    assert [tuple(t.shape) for t in sampled] == [tuple(p.shape) for p in weights]
    assert all(a is b for a, b in zip(order, sampled))  # released first, in the order sampled
    assert model_identity(model) == expected


def test_large_int8_rows_are_huge_page_aligned_mappings_that_their_views_keep_alive():
    """Rows of 2 MB or more get their own mapping, advised to huge pages (Linux); smaller ones torch's memory."""
    assert huge_page_empty((4, 8), torch.int8).shape == (4, 8)
    rows = huge_page_empty((HUGE_PAGE // 640 + 1, 640), torch.int8)
    assert rows.dtype == torch.int8 and rows.is_contiguous() and rows.shape == (HUGE_PAGE // 640 + 1, 640)
    rows.fill_(7)
    view = rows[3:5]
    del rows
    gc.collect()
    assert int(view.sum()) == 7 * 2 * 640  # the mapping outlives the tensor it was made for
    if sys.platform == "linux":  # an LM head's rows, quantized
        assert Int8Blocks.quantize(torch.randn(4000, 640)).rows.data_ptr() % HUGE_PAGE == 0


def _huge_kib() -> int:
    return int(Path("/proc/self/smaps_rollup").read_text().split("AnonHugePages:")[1].split()[0])


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
                    or "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(),
                    reason="the kernel gives no transparent huge pages")
def test_the_advice_is_taken_where_the_kernel_gives_huge_pages():
    before = _huge_kib()
    rows = huge_page_empty((3 * HUGE_PAGE,), torch.int8)
    rows.fill_(1)
    assert _huge_kib() - before >= 2 * HUGE_PAGE // 1024  # at least two of its three pages huge


def test_an_int8_models_weights_under_two_megabytes_share_one_huge_page_mapping(monkeypatch):
    """Every int8 rows and scale under 2 MB (here all of a tiny model's) is copied into one huge-page mapping: the
    tied LM head still shares the embedding's blocks, sibling layers are still views of their shared blocks, and
    the logits are those of the same model left in torch's memory."""
    from selfextend import weights
    from selfextend.allocator import SharedHugePages

    def tied():
        model = make_model("gemma3")
        model.lm_head.weight = model.model.embed_tokens.weight
        return model

    ids = _ids(12)
    model = compress(tied(), "int8")
    with monkeypatch.context() as patch:
        patch.setattr(weights, "_share_huge_pages", lambda model: None)
        apart = compress(tied(), "int8")
    assert torch.equal(_logits(model, ids), _logits(apart, ids))
    packed = [m for m in model.modules() if isinstance(m, (PackedLinear, CompactEmbedding))]
    tensors = [t for m in packed for t in (m.rows, m.scale)]
    start, end = min(t.data_ptr() for t in tensors), max(t.data_ptr() + t.numel() * t.element_size() for t in tensors)
    assert end - start <= SharedHugePages.room(list({t.data_ptr(): t for t in tensors}.values()))  # side by side
    assert model.lm_head.rows.data_ptr() == model.model.embed_tokens.rows.data_ptr()
    assert model.lm_head.scale.data_ptr() == model.model.embed_tokens.scale.data_ptr()
    attention = model.model.layers[0].self_attn
    shared = attention.q_proj.siblings.blocks
    assert attention.q_proj.rows.data_ptr() == shared.rows.data_ptr()
    assert attention.k_proj.rows.data_ptr() == shared.rows.data_ptr() + attention.q_proj.rows.numel()
    assert attention.k_proj.scale.data_ptr() == shared.scale.data_ptr() + attention.q_proj.scale.numel() * 2


def test_shared_huge_pages_hold_copies_one_after_another_on_cache_lines():
    from selfextend.allocator import SharedHugePages

    parts = [torch.randn(1000, 640).to(torch.int8), torch.randn(1000, 20).half(), torch.randn(3)]
    pages = SharedHugePages(SharedHugePages.room(parts) + HUGE_PAGE)  # over 2 MB: huge pages on Linux
    copies = [pages.copy(part) for part in parts]
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(parts, copies))
    assert [c.data_ptr() - copies[0].data_ptr() for c in copies] == [0, 640_000, 640_000 + 40_000]
    if sys.platform == "linux":
        assert copies[0].data_ptr() % HUGE_PAGE == 0
    with pytest.raises(ValueError, match="do not fit"):
        pages.copy(torch.empty(HUGE_PAGE + 1, dtype=torch.int8))
