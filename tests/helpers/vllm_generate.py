"""Run in vLLM's own virtual environment: one offline vLLM engine (the selfextend plugin loaded through its
entry point) over a saved model, greedy tokens and their log-probabilities for a batch of prompts.

    python vllm_generate.py REQUEST.json OUT.json

REQUEST: {"engine": {LLM keyword arguments}, "rounds": [[prompt token ids, ...], ...], "max_tokens": N,
"backend": "cpu" (default) or "gpu": the plugin's GPU backend in CPU_ATTN's place (see `gpu_backend_on_cpu`)}.
Each round is one `generate` call (its prompts run concurrently, continuously batched); rounds run one after
another on the same engine, so a later round can hit the prefix cache of an earlier one. OUT: {"rounds":
[[{"tokens", "logprobs", "cached"}, ...], ...], "keys_rotated": [per SelfExtend layer, keys it rotated],
"kernel_calls": [per SelfExtend layer, {kernel: calls}], "threads_placed_by": who places the worker's threads
for SelfExtend's block workers (null: none), "preemptions": requests preempted (null unless the engine logs
stats)}.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine and worker in this process: 5 s to start


def counts(model) -> dict[str, list]:
    """Per SelfExtend layer (sliding and plain layers have no counts): keys it rotated to grouped positions, and
    calls per kernel it took."""
    from selfextend.attention import workers

    impls = [module.impl for module in model.modules() if hasattr(getattr(module, "impl", None), "keys_rotated")]
    return {"keys_rotated": [impl.keys_rotated for impl in impls],
            "kernel_calls": [dict(impl.kernel_calls) for impl in impls],
            "threads_placed_by": workers.threads_placed_by()}


def preemptions(llm) -> int | None:
    """Requests the scheduler preempted (their blocks freed, recomputed later); None without stats logging."""
    if llm.llm_engine.log_stats is False:
        return None
    return int(sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"))


def gpu_backend_on_cpu() -> None:
    """Run the plugin's GPU backend (TRITON_ATTN's cache layout and metadata) on CPU: put it in CPU_ATTN's place
    and do vLLM's Triton cache writer in torch. vLLM's Triton attention kernel itself cannot run here: a request
    that reaches it fails the run."""
    from vllm.plugins import load_general_plugins
    from vllm.v1.attention.backends import triton_attn
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from selfextend.vllm import GPU_BACKEND

    load_general_plugins()  # the plugin's own registration first (vLLM loads plugins once per process)
    register_backend(AttentionBackendEnum.CPU_ATTN, GPU_BACKEND)
    triton_attn.triton_reshape_and_cache_flash = write_cache


def write_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale) -> None:
    """vLLM's Triton cache writer, in torch: token t's key and value [t, heads, d] into cache slot slot_mapping[t]
    of key_cache/value_cache [blocks, block_size, heads, d] (-1: a padding token, not written)."""
    slots = slot_mapping.long()
    kept = slots >= 0
    blocks, offsets = slots[kept] // key_cache.shape[1], slots[kept] % key_cache.shape[1]
    key_cache[blocks, offsets] = key[:len(slots)][kept]
    value_cache[blocks, offsets] = value[:len(slots)][kept]


def main(request_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    request = json.load(open(request_path))
    if request.get("backend", "cpu") == "gpu":
        gpu_backend_on_cpu()
    llm = LLM(**{"dtype": "float32", "enforce_eager": True, **request["engine"]})
    sampling = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True, logprobs=1)
    rounds = []
    for prompts in request["rounds"]:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
        rounds.append([{"tokens": list(o.outputs[0].token_ids),
                        "logprobs": [step[token].logprob for step, token in zip(o.outputs[0].logprobs,
                                                                                o.outputs[0].token_ids)],
                        "cached": o.num_cached_tokens or 0} for o in outputs])
    json.dump({"rounds": rounds, **llm.apply_model(counts)[0], "preemptions": preemptions(llm)}, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
