"""A model's identity: a hash of its architecture and of samples of every weight tensor, which keys its profile.

Weights are rounded to bfloat16 before hashing, so the same weights loaded in float32 or bfloat16 match
(float16 may not). A model whose weights were stored in a lighter format (`selfextend.weights.compress`)
keeps the identity of the weights it was made from, so it finds their profile.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import torch
from torch import nn

from .rotary import rope_parameters_of

IDENTITY_ATTRIBUTE = "_selfextend_identity"  # set on a model whose weights were compressed
_SAMPLE = 1024  # values hashed from each end of a tensor, and strided through it
_ARCHITECTURE = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                 "sliding_window", "layer_types")


def model_identity(model: nn.Module, done: Callable[[torch.Tensor], None] | None = None) -> str:
    """A hash of `model`'s architecture and weights that no other model shares (dtype float32/bfloat16 alike).

    `done` is given each weight once its samples are read (compress drops the file pages they brought in).
    """
    stamped = getattr(model, IDENTITY_ATTRIBUTE, None)
    if stamped is not None:
        return stamped
    text = model.config.get_text_config()
    architecture = {key: getattr(text, key, None) for key in _ARCHITECTURE}
    architecture["rope"] = rope_parameters_of(text)
    digest = hashlib.sha256(json.dumps(architecture, sort_keys=True, default=str).encode())
    for name, parameter in sorted(model.named_parameters()):
        digest.update(f"{name}:{tuple(parameter.shape)}".encode())
        if parameter.device.type == "meta":
            continue
        flat = parameter.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        sample = torch.cat([flat[:_SAMPLE], flat[::step][:_SAMPLE], flat[-_SAMPLE:]])
        digest.update(sample.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
        if done is not None:
            done(parameter)
    return digest.hexdigest()[:32]
