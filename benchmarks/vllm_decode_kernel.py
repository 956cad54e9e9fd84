"""The vLLM plugin's decode kernel call in isolation: 8 decoding rows of ~500 keys (testbed heads, G=6, W=32),
batched and left-padded (as the plugin now runs them) against one call per row and against plain SDPA.

    python benchmarks/vllm_decode_kernel.py      # from the repository root
"""
import time, torch
from selfextend.attention import resolve_backend, resolve_geometry, KVLayout
from selfextend.rotary import GroupedRotation, rope_from_config
import transformers
cfg = transformers.AutoConfig.from_pretrained("src/selfextend/testbed/weights")
rot = GroupedRotation(6, 32, rope_from_config(cfg))
k = resolve_backend("blockwise", torch.device("cpu"))
B, h, d = 8, 4, 32
lengths = torch.tensor([500 + 3 * i for i in range(B)])
T = 528
keys = torch.randn(B, h, T, d); values = torch.randn(B, h, T, d); q = torch.randn(B, h, 1, d)
def batched():
    g = resolve_geometry(KVLayout(q_offset=T - 1, kv_offset=0), None, B, 1, T, q.device, starts=(T - lengths)[:, None])
    return k.selfextend(q, keys, values, g, rot, 0.17)
def single():
    for r in range(B):
        n = int(lengths[r])
        g = resolve_geometry(KVLayout(q_offset=n - 1, kv_offset=0), None, 1, 1, n, q.device)
        k.selfextend(q[r:r+1], keys[r:r+1, :, :n].contiguous(), values[r:r+1, :, :n].contiguous(), g, rot, 0.17)
def vanilla():
    torch.nn.functional.scaled_dot_product_attention(q, keys, values)
for f in (batched, single, vanilla):
    f(); t = time.perf_counter()
    for _ in range(50): f()
    print(f.__name__, (time.perf_counter() - t) / 50 * 1e3, "ms")
with torch.profiler.profile() as p:
    for _ in range(20): batched()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))  # where the batched call spends its time
