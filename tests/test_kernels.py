"""Kernels against the oracle, and the oracle against a pair-by-pair reading of the formula."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from selfextend.attention import blockwise, paged, paged_native
from selfextend.attention.layout import KVLayout, resolve_geometry
from selfextend.attention.merge import merge_states
from selfextend.attention.reference import reference_attention
from selfextend.positions import grouped_key_position, grouped_query_position
from selfextend.rotary import GroupedRotation, RopeSource


def inv_freq(head_dim: int = 16) -> torch.Tensor:
    """Plain RoPE's inverse frequencies (base 10000) for `head_dim`."""
    return 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))


def make_rotation(G, W, offset=None, head_dim=16, device="cpu") -> GroupedRotation:
    """SelfExtend's rotation (STRING's given `offset`) over a plain RoPE table of `head_dim`, on `device`."""
    holder = torch.nn.Module()
    holder.register_buffer("inv_freq", inv_freq(head_dim).to(device))
    return GroupedRotation(G, W, RopeSource(holder, "inv_freq"), offset)


def _hf_rope(x, positions):
    freqs = positions[..., None].float() * inv_freq(x.shape[-1]).to(x.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return apply_rotary_pos_emb(x, x, emb.cos(), emb.sin())[0]


def make_problem(n_queries, n_keys, pads, heads=4, kv_heads=2, seed=0, head_dim=16, device="cpu",
                 dtype=torch.float32):
    """Raw q/k/v, the model-rotated q/k and the geometry of a left-padded batch (pads per row), drawn on the CPU
    (the same numbers on every device) and moved to `device` in `dtype`."""
    torch.manual_seed(seed)
    b = len(pads)
    valid = torch.arange(n_keys)[None, :] >= torch.tensor(pads)[:, None]
    positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
    layout = KVLayout(q_offset=n_keys - n_queries, kv_offset=0, valid=None if not any(pads) else valid.to(device))
    geometry = resolve_geometry(layout, positions[:, -n_queries:].to(device), b, n_queries, n_keys, torch.device(device))
    q0, k0 = torch.randn(b, heads, n_queries, head_dim), torch.randn(b, kv_heads, n_keys, head_dim)
    v = torch.randn(b, kv_heads, n_keys, head_dim)
    q, k = _hf_rope(q0, geometry.query_positions.cpu()), _hf_rope(k0, geometry.key_positions.cpu())
    return tuple(x.to(device, dtype) for x in (q0, k0, v, q, k)) + (geometry,)


def check_pair_by_pair(rotation, rope_positions, scale=0.25):
    """The oracle under `rotation` against logits built pair by pair: `rope_positions(i, j)` gives the RoPE
    positions at which query i and key j meet."""
    q0, k0, v, q, k, geometry = make_problem(9, 30, pads=[0, 4])
    got = reference_attention(q, k, v, geometry, rotation, scale)
    for b in range(2):
        for h in range(4):
            for t in range(9):
                i = int(geometry.query_positions[b, t])
                logits = []
                for s in range(30):
                    j = int(geometry.key_positions[b, s])
                    if not bool(geometry.valid[b, s]) or j > i:
                        logits.append(float("-inf"))
                        continue
                    qi, kj = rope_positions(i, j)
                    qr = _hf_rope(q0[b:b + 1, h:h + 1, t:t + 1], torch.tensor([[qi]]))
                    kr = _hf_rope(k0[b:b + 1, h // 2:h // 2 + 1, s:s + 1], torch.tensor([[kj]]))
                    logits.append(float((qr * kr).sum()) * scale)
                expected = torch.softmax(torch.tensor(logits), dim=0) @ v[b, h // 2]
                torch.testing.assert_close(got[b, t, h], expected, atol=2e-5, rtol=1e-4)


def test_oracle_reads_the_formula_pair_by_pair():
    G, W = 3, 5
    check_pair_by_pair(make_rotation(G, W), lambda i, j: (i, j) if i - j < W else
                       (grouped_query_position(i, G, W), grouped_key_position(j, G)))


@pytest.mark.parametrize("n_queries, n_keys", [(70, 70), (1, 70), (13, 70), (40, 90), (3, 5)])
@pytest.mark.parametrize("pads", [[0], [0, 11, 3]])
@pytest.mark.parametrize("block", [4, 7, 64])
@pytest.mark.parametrize("G, W", [(4, 8), (3, 10), (1, 6), (7, 1)])
def test_blockwise_matches_oracle(n_queries, n_keys, pads, block, G, W):
    _, _, v, q, k, geometry = make_problem(n_queries, n_keys, pads)
    expected = reference_attention(q, k, v, geometry, make_rotation(G, W), 0.3)
    got = blockwise.selfextend_attention(q, k, v, geometry, make_rotation(G, W), 0.3, block=block)
    rows = geometry.query_positions >= 0  # padded queries see nothing; both give zeros there
    torch.testing.assert_close(got[rows], expected[rows], atol=1e-5, rtol=1e-5)
    assert torch.all(got[~rows] == 0)


@pytest.mark.parametrize("n_queries, n_keys", [(1, 70), (13, 70)])
@pytest.mark.parametrize("pads", [[0], [0, 11, 3]])
def test_with_kept_grouped_keys_the_far_keys_are_not_read(n_queries, n_keys, pads):
    """Given the grouped keys, keys at distance >= W from every query are read only through them: NaN there
    changes nothing (the contract selfextend_attention documents)."""
    _, _, v, q, k, geometry = make_problem(n_queries, n_keys, pads)
    rotation = make_rotation(4, 8)
    kept = rotation(k, geometry.key_positions, "key")
    expected = blockwise.selfextend_attention(q, k, v, geometry, rotation, 0.3, kept, block=7)
    far = k.clone()
    far[:, :, :geometry.shift - 8 + 1] = float("nan")  # farther than W = 8 from the first query
    got = blockwise.selfextend_attention(q, far, v, geometry, rotation, 0.3, kept, block=7)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("n_queries, n_keys, kv_offset", [(50, 50, 0), (1, 11, 40), (9, 20, 30)])
@pytest.mark.parametrize("pads", [[0], [0, 5]])
def test_local_attention_matches_oracle(n_queries, n_keys, kv_offset, pads):
    # a sliding-window cache holds keys kv_offset.. of the sequence; queries are its last n_queries entries
    torch.manual_seed(1)
    b, window = len(pads), 12
    total = kv_offset + n_keys
    valid = (torch.arange(total)[None, :] >= torch.tensor(pads)[:, None])
    positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
    layout = KVLayout(total - n_queries, kv_offset, valid[:, kv_offset:] if any(pads) else None, window)
    geometry = resolve_geometry(layout, positions[:, -n_queries:], b, n_queries, n_keys, torch.device("cpu"))
    q, k, v = torch.randn(b, 4, n_queries, 16), torch.randn(b, 2, n_keys, 16), torch.randn(b, 2, n_keys, 16)
    expected = reference_attention(q, k, v, geometry, None, 0.3, local_window=window)
    got = blockwise.local_attention(q, k, v, geometry, window, 0.3, block=5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_sliding_layers_decode_step_is_one_call_with_the_blocked_paths_bits(dtype):
    """One query takes its window's keys in one call: the bits the blocked path's single piece gives."""
    torch.manual_seed(3)
    window, n_keys = 12, 30
    layout = KVLayout(n_keys - 1, 0, None, window)
    geometry = resolve_geometry(layout, torch.arange(n_keys)[None, -1:], 1, 1, n_keys, torch.device("cpu"))
    q = torch.randn(1, 4, 1, 16)
    k, v = (torch.randn(1, 2, n_keys, 16).to(dtype) for _ in range(2))
    blocked = q.new_empty(1, 1, 4, 16)
    blockwise._attend_block(blocked, q, k, v, geometry, 0, window, 0.3, 1)
    assert torch.equal(blockwise.local_attention(q, k, v, geometry, window, 0.3), blocked)


def test_merge_of_split_keys_is_exact():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    logits = q @ k.transpose(-1, -2)
    parts = [(0, 7), (7, 8), (8, 20)]
    outs, lses = [], []
    for a, b in parts:
        lse = torch.logsumexp(logits[..., a:b], -1)
        outs.append(torch.softmax(logits[..., a:b], -1) @ v[:, :, a:b])
        lses.append(lse)
    outs.append(torch.zeros_like(outs[0]))
    lses.append(torch.full_like(lses[0], float("-inf")))  # an empty partial weighs nothing
    torch.testing.assert_close(merge_states(outs, lses), torch.softmax(logits, -1) @ v)


def check_flex_against_oracle(flex, q, k, v, geometry, rotation, scale: float, local_window: int | None = None):
    """The FlexAttention backend's position map (and, given `local_window`, its sliding window) against the oracle
    on every real query row."""
    rows = geometry.query_positions >= 0
    got = flex.selfextend_attention(q, k, v, geometry, rotation, scale)
    expected = reference_attention(q, k, v, geometry, rotation, scale)
    torch.testing.assert_close(got[rows], expected[rows], atol=1e-5, rtol=1e-5)
    if local_window is not None:
        local = flex.local_attention(q, k, v, geometry, local_window, scale)
        expected_local = reference_attention(q, k, v, geometry, None, scale, local_window=local_window)
        torch.testing.assert_close(local[rows], expected_local[rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_queries, n_keys", [(70, 70), (40, 90), (1, 70)])
@pytest.mark.parametrize("pads", [[0], [0, 11, 3]])
def test_flex_backend_matches_oracle(n_queries, n_keys, pads, monkeypatch):
    flex = pytest.importorskip("selfextend.attention.flex")
    monkeypatch.setattr(flex, "MIN_QUERIES", 2)  # exercise the block-mask path at test sizes
    _, _, v, q, k, geometry = make_problem(n_queries, n_keys, pads)
    check_flex_against_oracle(flex, q, k, v, geometry, make_rotation(4, 8), 0.3, local_window=12)


def test_portable_partial_matches_cpu_kernel():
    from selfextend.attention.partial import _attend_math, attend

    torch.manual_seed(3)
    q, k, v = torch.randn(2, 6, 5, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    mask = torch.rand(2, 1, 5, 9) > 0.3
    mask[1, 0, 2] = False  # a row that sees nothing
    out, lse = attend(q, k, v, mask, 0.3)
    out_math, lse_math = _attend_math(q, k, v, mask, 0.3)
    torch.testing.assert_close(out_math.masked_fill(~mask.any(-1)[..., None], 0), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_math, lse)


def _paged(lengths, block_size, n_blocks, transposed, seed=0):
    """Rows of keys (rotated at 0..length-1) and values written into a NaN-filled paged cache at shuffled
    blocks; table entries past a row's blocks point anywhere. Returns the rows, the cache views and the table."""
    torch.manual_seed(seed)
    count = -(-max(lengths) // block_size)
    order = torch.randperm(n_blocks)
    keys = torch.full((n_blocks, 2, block_size, 16), float("nan"))
    values = torch.full_like(keys, float("nan"))
    table = torch.randint(0, n_blocks, (len(lengths), count + 2), dtype=torch.int32)
    rows, used = [], 0
    for r, n in enumerate(lengths):
        k = _hf_rope(torch.randn(1, 2, n, 16), torch.arange(n)[None])
        v = torch.randn(1, 2, n, 16)
        mine = -(-n // block_size)
        table[r, :mine] = order[used:used + mine].int()
        used += mine
        for s in range(n):
            block = int(table[r, s // block_size])
            keys[block, :, s % block_size], values[block, :, s % block_size] = k[0, :, s], v[0, :, s]
        rows.append((k, v))
    if transposed:  # stored [d, block_size] per block and head (vLLM's CPU layout), read through a view
        keys = keys.transpose(-1, -2).contiguous().transpose(-1, -2)
    return rows, keys, values, table


@pytest.mark.parametrize("lengths, queries", [([70, 33, 5, 64], None), ([41], None), ([70, 33, 5, 64], [9, 1, 5, 2]),
                                              ([41], [12])])
@pytest.mark.parametrize("G, W", [(4, 8), (3, 10), (1, 6), (5, 40)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("kept", [False, True])
def test_paged_attention_matches_oracle(lengths, queries, G, W, transposed, kept):
    """Each row's last queries (one each: decoding) over keys read in place from shuffled cache blocks
    (unwritten slots NaN), against the oracle on each row's keys alone; with the grouped keys kept in the
    same slots, or rotated there."""
    rotation, block_size = make_rotation(G, W), 8
    rows, keys, values, table = _paged(lengths, block_size, 40, transposed)
    grouped = None
    if kept:
        grouped = torch.full(keys.shape, float("nan"))
        for block in range(40):  # the keys' slots, at their grouped positions (NaN stays NaN)
            for r, n in enumerate(lengths):
                if block in table[r, :-(-n // block_size)].tolist():
                    first = table[r].tolist().index(block) * block_size
                    positions = torch.arange(first, first + block_size)[None]
                    grouped[block] = rotation(keys[block][None], positions, "key")[0]
    counts = queries or [1] * len(lengths)
    query = torch.randn(len(lengths), max(counts), 4, 16)
    plan = paged.paged_plan(table, torch.tensor(lengths), None if queries is None else torch.tensor(queries), 40,
                            block_size, 2, rotation)
    got = paged.paged_attention(query, keys, values, plan, rotation, 0.3, grouped)
    for r, (n, q, (k, v)) in enumerate(zip(lengths, counts, rows)):
        geometry = resolve_geometry(KVLayout(q_offset=n - q, kv_offset=0), None, 1, q, n, torch.device("cpu"))
        expected = reference_attention(query[r:r + 1, :q].transpose(1, 2), k, v, geometry, rotation, 0.3)
        torch.testing.assert_close(got[r, :q], expected[0], atol=1e-5, rtol=1e-5)


def _kept(keys, table, lengths, block_size, rotation):
    """The grouped form of every written key, in its slot (other slots NaN), stored like `keys`."""
    grouped = torch.full(keys.shape, float("nan")).transpose(-1, -2).contiguous().transpose(-1, -2)
    for r, n in enumerate(lengths):
        for b, block in enumerate(table[r, :-(-n // block_size)].tolist()):
            positions = torch.arange(b * block_size, (b + 1) * block_size)[None]
            grouped[block] = rotation(keys[block][None], positions, "key")[0]
    return grouped


@pytest.mark.parametrize("lengths, queries", [([70, 33, 5, 64], [1, 1, 1, 1]), ([70, 33, 5, 64], [9, 1, 5, 2]),
                                              ([41], [12]), ([1300, 7, 600], [3, 1, 2])])
@pytest.mark.parametrize("G, W", [(4, 8), (3, 10), (1, 6), (5, 40), (16, 700)])
@pytest.mark.parametrize("kept", [False, True])
def test_native_paged_attention_matches_oracle(lengths, queries, G, W, kept):
    """The C kernel on rows laid out as an engine's step (queries token after token, unwritten slots NaN,
    keys stored transposed), rows of more than one 512-key chunk merged, against the oracle per row; other
    tokens' outputs are left untouched."""
    rotation, block_size = make_rotation(G, W), 8
    n_blocks = sum(-(-n // block_size) for n in lengths) + 4
    rows, keys, values, table = _paged(lengths, block_size, n_blocks, True)
    grouped = _kept(keys, table, lengths, block_size, rotation) if kept else None
    starts = torch.tensor([0, *queries]).cumsum(0)
    query = torch.randn(int(starts[-1]) + 2, 4, 16)  # two tokens past the rows: not theirs, left as they are
    output = torch.full_like(query, 7.0)
    picked = torch.tensor([r for r in range(len(lengths)) if r != 1])  # row 1 is not asked for
    step = paged_native.native_step(table, torch.tensor(lengths), starts, picked, rotation)
    rotated = paged_native.native_paged_attention(query, output, keys.transpose(-1, -2), values, step, 0.3,
                                                  None if grouped is None else grouped.transpose(-1, -2))
    for r in picked.tolist():
        n, q, (k, v) = lengths[r], queries[r], rows[r]
        a, b = int(starts[r]), int(starts[r + 1])
        geometry = resolve_geometry(KVLayout(q_offset=n - q, kv_offset=0), None, 1, q, n, torch.device("cpu"))
        expected = reference_attention(query[None, a:b].transpose(1, 2), k, v, geometry, rotation, 0.3)
        torch.testing.assert_close(output[a:b], expected[0], atol=1e-5, rtol=1e-5)
    untouched = torch.ones(len(output), dtype=torch.bool)
    for r in picked.tolist():
        untouched[int(starts[r]):int(starts[r + 1])] = False
    assert bool((output[untouched] == 7.0).all())
    if kept:
        assert rotated == 0
    else:  # each far key of a chunk it reads: at least one per far (query, key head) pair
        assert rotated > 0 or all(n <= W for n in lengths)


def test_native_grouped_keys_written_at_their_slots():
    """A step's new keys (two requests, one padding token) land at their slots in grouped form, exactly as the
    torch rotation gives them; other slots keep what they held."""
    rotation, block_size, heads, dim = make_rotation(4, 8), 8, 2, 16
    grouped = torch.full((10, heads, dim, block_size), float("nan"))
    lengths = torch.tensor([21, 6])
    starts = torch.tensor([0, 3, 9])
    key = torch.randn(10, heads, dim)
    slots = torch.tensor([5 * 8 + 2, 5 * 8 + 3, 5 * 8 + 4, 1 * 8 + 0, 1 * 8 + 1, 1 * 8 + 2, -1, 1 * 8 + 4, 1 * 8 + 5,
                          0])
    step = paged_native.native_step(torch.zeros(2, 1), lengths, starts, torch.tensor([]), rotation, slots)
    written = paged_native.write_grouped_keys(key, step, grouped)
    assert written == 8
    positions = torch.tensor([18, 19, 20, 0, 1, 2, 3, 4, 5])
    for t in range(9):
        if slots[t] >= 0:
            expected = rotation(key[t, :, None][None], positions[t].view(1, 1), "key")[0, :, 0]
            torch.testing.assert_close(grouped[slots[t] // 8, :, :, slots[t] % 8], expected, atol=0, rtol=0)
    assert int(grouped.isnan().sum()) == (10 * block_size - 8) * heads * dim
