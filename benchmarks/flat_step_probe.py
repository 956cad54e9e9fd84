"""How much of a decode step a hand-written step could save: the embedded Gemma 3 270M's step as transformers
runs it, beside a flat loop over the very same modules' `forward`s (our int8, norm, RoPE and attention code as
loaded; no module-call machinery, no decoder-layer or attention-module Python, masks and RoPE tables made once
a step as transformers makes them), taking turns over a random KV cache, the logits compared bit for bit.

A measurement for planning issue #23's hand-written decode step, not a path the library takes: the flat loop
knows Gemma 3's layer (transformers 5.25) and nothing else.

    python benchmarks/flat_step_probe.py --tokens 16384 --steps 60 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def flat_step(model, token, cache, position, masks: dict, rope: dict):
    """One decode step of a Gemma 3 model, its modules' forwards called in transformers' order: the logits."""
    from transformers.models.gemma3 import modeling_gemma3

    from selfextend import integration

    tm = model.model
    h = tm.embed_tokens.forward(token)
    types = tm.config.layer_types
    for i, layer in enumerate(tm.layers):
        attn = layer.self_attn
        shape = (1, 1, -1, attn.head_dim)
        residual = h
        x = layer.input_layernorm.forward(h)
        q = attn.q_proj.forward(x).view(shape).transpose(1, 2)
        k = attn.k_proj.forward(x).view(shape).transpose(1, 2)
        v = attn.v_proj.forward(x).view(shape).transpose(1, 2)
        q, k = attn.q_norm.forward(q), attn.k_norm.forward(k)
        q, k = modeling_gemma3.apply_rotary_pos_emb(q, k, *rope[types[i]])
        integration._find_kept_keys(attn, (), {"cache": cache})  # the pre-hook transformers' call would run
        k, v = cache.update(k, v, attn.layer_idx)
        out, _ = integration._attention_forward(attn, q, k, v, masks[types[i]], scaling=attn.scaling,
                                                sliding_window=attn.sliding_window, position_ids=position)
        h = residual + layer.post_attention_layernorm.forward(attn.o_proj.forward(out.reshape(1, 1, -1)))
        residual = h
        x, mlp = layer.pre_feedforward_layernorm.forward(h), layer.mlp
        x = mlp.down_proj.forward(mlp.act_fn.forward(mlp.gate_proj.forward(x)) * mlp.up_proj.forward(x))
        h = residual + layer.post_feedforward_layernorm.forward(x)
    return model.lm_head.forward(tm.norm.forward(h))


def step_inputs(model, token, cache):
    """The step's position, masks and RoPE tables, made as Gemma3TextModel.forward makes them."""
    import torch
    from transformers import masking_utils

    tm = model.model
    embeds = tm.embed_tokens.forward(token)
    position = torch.tensor([[cache.get_seq_length()]])
    kwargs = dict(config=tm.config, inputs_embeds=embeds, attention_mask=None, cache=cache, position_ids=position)
    masks = {"full_attention": masking_utils.create_causal_mask(**kwargs),
             "sliding_attention": masking_utils.create_sliding_window_causal_mask(**kwargs)}
    rope = {kind: tm.rotary_emb(embeds, position, kind) for kind in set(tm.config.layer_types)}
    return position, masks, rope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="the random cache's length")
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each kind, taking turns")
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch

    from selfextend.transformers_compat import cache_kwargs
    from decode_breakdown import main_job_cache, main_job_model

    model = main_job_model(args.tokens + 2 * args.steps + 64)
    caches = {}
    for kind in ("transformers", "flat"):  # the same random keys and values in each
        torch.manual_seed(0)
        caches[kind] = main_job_cache(model, args.tokens)
    times: dict[str, list[float]] = {"transformers": [], "flat": []}
    token = torch.tensor([[1]])
    equal = True
    with torch.inference_mode():
        for step in range(args.steps + 3):  # 3 untimed
            start = time.perf_counter()
            ours = model(token, **cache_kwargs(model, caches["transformers"]), use_cache=True,
                         logits_to_keep=1).logits[:, -1]
            middle = time.perf_counter()
            flat = flat_step(model, token, caches["flat"], *step_inputs(model, token, caches["flat"]))[:, -1]
            end = time.perf_counter()
            equal &= torch.equal(ours, flat)
            if step >= 3:
                times["transformers"].append(middle - start)
                times["flat"].append(end - middle)
            token = ours.argmax(-1, keepdim=True)
    row = {"tokens": args.tokens, "steps": args.steps, "bit_equal_logits": bool(equal),
           **{f"{kind}_ms": 1e3 * statistics.median(t) for kind, t in times.items()}}
    row["saved_ms"] = row["transformers_ms"] - row["flat_ms"]
    print(f"{args.tokens} cached tokens, median of {args.steps} steps each: transformers' step "
          f"{row['transformers_ms']:.1f} ms, flat loop {row['flat_ms']:.1f} ms (saves {row['saved_ms']:.1f} ms, "
          f"{row['saved_ms'] / row['transformers_ms']:.0%}); logits bit for bit equal: {equal}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
