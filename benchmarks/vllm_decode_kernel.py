"""The vLLM plugin's decode attention for one layer in isolation: 8 decoding rows of ~500 keys in a paged cache
(testbed heads, G=6, W=32, blocks of 16, kept grouped keys), read in place by the native C kernel (as the
plugin runs them in float32) and by the torch paged kernel (its fallback), against gathering them
left-padded into the blockwise kernel (as it ran them before) and against plain SDPA over the same gathered
keys (what no SelfExtend costs). Times are per call, each including its once-per-step indices; ratios to SDPA.

    python benchmarks/vllm_decode_kernel.py      # from the repository root; quiet machine
"""
import time

import torch
import transformers

from selfextend.attention import KVLayout, resolve_backend, resolve_geometry
from selfextend.attention.paged import paged_attention, paged_plan
from selfextend.attention.paged_native import native_paged_attention, native_step
from selfextend.rotary import GroupedRotation, rope_from_config

cfg = transformers.AutoConfig.from_pretrained("src/selfextend/testbed/weights")
rotation = GroupedRotation(6, 32, rope_from_config(cfg))
blockwise = resolve_backend("blockwise", torch.device("cpu"))
torch.manual_seed(0)
rows, heads, query_heads, dim, block = 8, 4, 4, 32, 16
lengths = torch.tensor([500 + 3 * r for r in range(rows)])
count = -(-int(lengths.max()) // block)
n_blocks = rows * count + 16
table = torch.randperm(n_blocks)[:rows * count].view(rows, count).int()
keys, values, grouped = (torch.randn(n_blocks, heads, block, dim) for _ in range(3))
query = torch.randn(rows, query_heads, dim)
total = count * block


def paged():
    plan = paged_plan(table, lengths, None, n_blocks, block, heads, rotation)  # once per step in the plugin
    return paged_attention(query[:, None], keys, values, plan, rotation, 0.17, grouped)[:, 0]


stored_keys, stored_grouped = (x.transpose(-1, -2).contiguous() for x in (keys, grouped))  # as vLLM stores keys


def native():
    step = native_step(table, lengths, torch.arange(rows + 1), torch.arange(rows), rotation)  # once per step
    out = torch.empty_like(query)
    native_paged_attention(query, out, stored_keys, values, step, 0.17, stored_grouped)
    return out


def _left_padded(per_block):
    out = per_block.new_zeros(rows, heads, total, dim)
    picked = per_block[table.long()].transpose(1, 2).reshape(rows, heads, total, dim)
    for r, n in enumerate(lengths.tolist()):
        out[r, :, total - n:] = picked[r, :, :n]
    return out


def left_padded():
    k, v, g = _left_padded(keys), _left_padded(values), _left_padded(grouped)
    geometry = resolve_geometry(KVLayout(q_offset=total - 1, kv_offset=0), None, rows, 1, total, query.device,
                                starts=(total - lengths)[:, None])
    return blockwise.selfextend(query[:, :, None], k, v, geometry, rotation, 0.17, g)[:, 0]


def sdpa():
    k, v = _left_padded(keys), _left_padded(values)
    hidden = torch.arange(total)[None, :] < (total - lengths)[:, None]
    return torch.nn.functional.scaled_dot_product_attention(query[:, :, None], k, v, attn_mask=~hidden[:, None, None])


torch.testing.assert_close(paged(), left_padded(), atol=1e-5, rtol=1e-5)  # the same attention
torch.testing.assert_close(native(), left_padded(), atol=1e-5, rtol=1e-5)
times = {}
for f in (sdpa, left_padded, paged, native):
    f()
    start = time.perf_counter()
    for _ in range(100):
        f()
    times[f.__name__] = (time.perf_counter() - start) / 100 * 1e3
for name, ms in times.items():
    print(f"{name:12s} {ms:7.3f} ms per layer  {ms / times['sdpa']:5.2f}x sdpa")
