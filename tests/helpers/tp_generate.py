"""Run under torchrun: a tiny saved Llama loaded with transformers' tensor parallelism (DistributedConfig),
SelfExtend applied, greedy generate; rank 0 saves the tokens. `python tp_generate.py MODEL OUT` without
torchrun runs the same in one process."""

import os
import sys

import torch
import transformers

import selfextend


def main(model_dir: str, out: str) -> None:
    distributed = "WORLD_SIZE" in os.environ
    kwargs = {"distributed_config": transformers.DistributedConfig(tp_plan="auto")} if distributed else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    selfextend.apply(model, 4, 8)
    ids = torch.randint(3, 97, (1, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        logits = model(ids).logits
    if not distributed or int(os.environ["RANK"]) == 0:
        weight = model.model.layers[0].self_attn.q_proj.weight
        local_rows = (weight.to_local() if hasattr(weight, "to_local") else weight).shape[0]
        torch.save({"tokens": tokens, "logits": logits, "world": int(os.environ.get("WORLD_SIZE", 1)),
                    "local_query_rows": local_rows}, out)
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
