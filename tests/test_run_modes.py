"""Every way transformers runs a model, against the oracle: static cache, compile, padding on either side,
packed sequences (in prefill and with a cache), several devices, and the entry points users expect."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import DynamicCache, StaticCache

import selfextend
from selfextend.attention import KVLayout, blockwise, layout_mask
from selfextend.rotary import GroupedRotation, find_rope
from selfextend.transformers_compat import cache_kwargs
from conftest import COMMON, make_model

G, W = 4, 8
STATIC_FAMILIES = ["llama", "qwen3", "gemma3"]  # plain, q/k-norm, and sliding-window layers


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(blockwise, "DEFAULT_BLOCK", 32)


def _ids(n, seed=1, batch=1):
    return torch.randint(3, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def _oracle(family):
    return selfextend.apply(make_model(family), G, W, backend="reference")


@torch.no_grad()
def _generate(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs)


# --- static cache ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", STATIC_FAMILIES)
def test_static_cache_generate_gives_the_dynamic_and_oracle_tokens(family):
    model = selfextend.apply(make_model(family), G, W)
    ids = _ids(150)
    static = _generate(model, ids, cache_implementation="static")
    assert torch.equal(static, _generate(model, ids))
    assert torch.equal(static, _generate(_oracle(family), ids))


def test_static_cache_with_a_left_padded_batch():
    model = selfextend.apply(make_model("llama"), G, W)
    ids = _ids(120, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    ids[1, :30] = 0
    static = _generate(model, ids, attention_mask=mask, cache_implementation="static")
    assert torch.equal(static, _generate(model, ids, attention_mask=mask))
    alone = _generate(model, ids[1:, 30:])
    assert torch.equal(static[1, 120:], alone[0, 90:])


def test_layout_survives_what_generate_does_to_a_mask():
    layout = layout_mask(1, 4, 10, q_offset=torch.tensor(6), attention_mask=torch.ones(1, 10, dtype=torch.long))
    assert layout.contiguous() is layout and layout.ndim == 4
    assert layout_mask(1, 4, 10, q_offset=6, attention_mask=layout, local_size=3) == KVLayout(6, 0, None, 3)
    padded = layout_mask(1, 4, 10, q_offset=6, attention_mask=torch.tensor([[0] * 3 + [1] * 7]))
    assert padded.to("cpu").valid.device.type == "cpu" and padded.to(torch.float16) is padded


@torch.no_grad()
def test_unused_static_slots_are_never_attended():
    """Poison the static buffer's unused tail with NaN: the next step must not see it."""
    model = selfextend.apply(make_model("llama"), G, W)
    ids = _ids(121)
    static = StaticCache(config=model.config, max_cache_len=200)
    dynamic = DynamicCache(config=model.config)
    model(ids[:, :120], **cache_kwargs(model, static), use_cache=True)
    model(ids[:, :120], **cache_kwargs(model, dynamic), use_cache=True)
    for layer in static.layers:
        layer.keys[:, :, 120:] = float("nan")
        layer.values[:, :, 120:] = float("nan")
    position = torch.tensor([[120]])
    got = model(ids[:, 120:], **cache_kwargs(model, static), position_ids=position, use_cache=True).logits
    expected = model(ids[:, 120:], **cache_kwargs(model, dynamic), position_ids=position, use_cache=True).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# --- torch.compile ----------------------------------------------------------------------------------------

GRAPH_BREAKS = 34  # measured: 35 graphs (2 layers, 40 tokens, 2 blocks of 32, each block a call of its own since
# the busy-machine workers: 50; 35 since traced calls take their grouped angles from the positions, not from kept
# blocks they would guard on); data-dependent Python ints break them


def _compiled(fn):
    """`fn` under torch.compile with a backend that runs each captured graph eagerly and counts them."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend), graphs


@torch.no_grad()
def test_compiled_forward_matches_the_oracle_and_graph_breaks_do_not_grow():
    ids = _ids(40)
    compiled, graphs = _compiled(selfextend.apply(make_model("llama"), G, W))
    torch.testing.assert_close(compiled(ids).logits, _oracle("llama")(ids).logits, atol=1e-5, rtol=1e-5)
    assert 1 <= len(graphs) - 1 <= GRAPH_BREAKS


@torch.no_grad()
def test_compiled_static_cache_generate_gives_the_oracle_tokens():
    model = selfextend.apply(make_model("llama"), G, W)
    model.forward, _ = _compiled(model.forward)
    ids = _ids(40)
    got = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static")
    oracle = _oracle("llama").generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(got, oracle)


# --- padding on either side, packed sequences ------------------------------------------------------------

@torch.no_grad()
def test_right_padding_gives_each_row_what_it_gives_alone():
    model = selfextend.apply(make_model("llama"), G, W)
    ids = _ids(150, batch=2)
    mask = torch.ones_like(ids)
    mask[1, 110:] = 0
    got = model(ids, attention_mask=mask).logits
    alone = model(ids[1:, :110]).logits
    torch.testing.assert_close(got[1:, :110], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:1], model(ids[:1]).logits, atol=1e-5, rtol=1e-5)


def _packed(lengths, seed=2):
    parts = [_ids(n, seed=seed + k) for k, n in enumerate(lengths)]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cuts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return parts, torch.cat(parts, dim=1), positions, cuts


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@torch.no_grad()
def test_packed_sequences_each_equal_themselves_alone(family):
    model = selfextend.apply(make_model(family), G, W)
    parts, ids, positions, cuts = _packed([100, 70, 130])
    for kwargs in ({}, {"use_cache": False}, {"cu_seq_lens_q": cuts, "cu_seq_lens_k": cuts, "max_length_q": 130,
                                               "max_length_k": 130}):
        got = model(ids, position_ids=positions, **kwargs).logits
        start = 0
        for part in parts:
            alone = model(part).logits
            torch.testing.assert_close(got[:, start:start + part.shape[1]], alone, atol=1e-5, rtol=1e-5)
            start += part.shape[1]


@torch.no_grad()
def test_packed_sequences_match_the_oracle():
    parts, ids, positions, _ = _packed([90, 110])
    got = selfextend.apply(make_model("llama"), G, W)(ids, position_ids=positions).logits
    oracle = torch.cat([_oracle("llama")(part).logits for part in parts], dim=1)
    torch.testing.assert_close(got, oracle, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_packed_sequences_in_chunks_over_a_cache():
    """Chunked prefill of a packed row: a chunk that continues one sequence and starts the next."""
    model = selfextend.apply(make_model("llama"), G, W)
    parts, ids, positions, _ = _packed([100, 80])
    cache = DynamicCache(config=model.config)
    chunks = [model(ids[:, a:b], position_ids=positions[:, a:b], **cache_kwargs(model, cache), use_cache=True).logits
              for a, b in [(0, 60), (60, 130), (130, 180)]]
    got = torch.cat(chunks, dim=1)
    torch.testing.assert_close(got[:, :100], model(parts[0]).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, 100:], model(parts[1]).logits, atol=1e-5, rtol=1e-5)
    # decoding after the packed row continues the last sequence only
    nxt = torch.tensor([[5]])
    step = model(nxt, position_ids=torch.tensor([[80]]), **cache_kwargs(model, cache), use_cache=True).logits
    alone = model(torch.cat([parts[1], nxt], dim=1)).logits[:, -1:]
    torch.testing.assert_close(step, alone, atol=1e-5, rtol=1e-5)


def test_cu_seq_lens_that_disagree_with_positions_are_an_error():
    model = selfextend.apply(make_model("llama"), G, W)
    _, ids, positions, _ = _packed([100, 70])
    with pytest.raises(ValueError, match="disagree"):
        model(ids, position_ids=positions, cu_seq_lens_q=torch.tensor([0, 50, 170], dtype=torch.int32))


# --- devices ------------------------------------------------------------------------------------------------

def test_rotation_tables_follow_the_input_device_and_dtype():
    model = make_model("llama")
    rotation = GroupedRotation(G, W, find_rope(model, model.config))
    x = torch.randn(1, 2, 5, 16)
    positions = torch.arange(40, 45)[None]
    on_cpu = rotation(x, positions, "key")
    assert rotation(x.to(torch.bfloat16), positions, "key").dtype == torch.bfloat16
    on_meta = rotation(x.to("meta"), positions, "key")  # a second device: its tables are built there
    assert on_meta.device.type == "meta" and on_cpu.device.type == "cpu"
    assert {device.type for _, device in rotation._blocks} == {"cpu", "meta"}


@torch.no_grad()
def test_layers_split_over_devices_with_disk_offload(tmp_path):
    """device_map puts layer 1 on disk (accelerate moves its weights in per forward): same logits."""
    pytest.importorskip("accelerate")
    folder = tmp_path / "tiny"
    make_model("llama").save_pretrained(folder)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    split = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map=device_map,
                                                              offload_folder=tmp_path / "offload").eval()
    ids = _ids(150)
    got = selfextend.apply(split, G, W)(ids).logits
    torch.testing.assert_close(got, _oracle("llama")(ids).logits, atol=1e-5, rtol=1e-5)


def test_tensor_parallel_two_processes_give_the_one_process_tokens(tmp_path):
    """transformers' own TP (torchrun, gloo on CPU) hands the attention function only the local heads."""
    torch.manual_seed(0)  # an even vocabulary: transformers 5.17 refuses to split an odd lm_head
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, "vocab_size": 98})).save_pretrained(
        tmp_path / "model")
    helper = str(Path(__file__).parent / "helpers" / "tp_generate.py")
    runs = {1: [sys.executable, helper], 2: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc-per-node", "2", helper]}
    got = {}
    for world, command in runs.items():
        out = tmp_path / f"tp{world}.pt"
        done = subprocess.run([*command, str(tmp_path / "model"), str(out)], capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        got[world] = torch.load(out)
    assert got[2]["world"] == 2 and got[2]["local_query_rows"] == got[1]["local_query_rows"] // 2
    assert torch.equal(got[2]["tokens"], got[1]["tokens"])
    torch.testing.assert_close(got[2]["logits"], got[1]["logits"], atol=1e-5, rtol=1e-5)


# --- entry points ---------------------------------------------------------------------------------------------

def test_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "selfextend", "plan", "--model", "testbed", "--length", "500",
                           "--effective-length", "100", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert '"group_size"' in done.stdout


@torch.no_grad()
def test_from_pretrained_with_attn_implementation_selfextend(tmp_path):
    """A saved model keeps its settings in config.json; loading it by name needs apply(), which restores them."""
    model = selfextend.apply(make_model("llama"), G, W)
    ids = _ids(150)
    expected = model(ids).logits
    model.save_pretrained(tmp_path / "saved")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved",
                                                               attn_implementation="selfextend").eval()
    assert loaded.config.selfextend["group_size"] == G
    with pytest.raises(RuntimeError, match=r"selfextend.apply\(model\) restores the saved settings"):
        loaded(ids)
    selfextend.apply(loaded)
    assert (selfextend.settings(loaded).group_size, selfextend.settings(loaded).window_size) == (G, W)
    torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
    selfextend.remove(loaded)
    assert loaded.config._attn_implementation == "sdpa" and not hasattr(loaded.config, "selfextend")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    del plain.config.selfextend
    with pytest.raises(ValueError, match="give group_size and window_size"):
        selfextend.apply(plain)
