"""Int8 linear layers of one module that read the same input (attention's q/k/v, an MLP's gate/up), multiplied
in one kernel call in a decode step.

A decode step's products are small: at 640 inputs a 256-row one ran at 6-9 GB/s where a 2048-row one ran at 14-18
(docs/results.md), and each call pays its Python wrapper. `group_siblings`
stores such siblings' int8 rows one after another (each layer's buffers become views of its part, so nothing
is held twice); the first of them called on an input of up to `NATIVE_TOKENS` tokens computes every sibling's
product in one call and hands each the other parts when it is called on that same input. A row's sum is the
same operations whatever rows share its call (`linear_native.c`), so every output is the same bits as alone.

A model that calls the siblings on different inputs (or not all of them on one) gets each computed on its own
from then on, with a warning: one product was computed for nothing, nothing else changes.
"""

from __future__ import annotations

import threading
import warnings
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from . import linear_native
from .allocator import huge_page_empty
from .linear_native import NATIVE_TOKENS, Int8Blocks


class SiblingProducts:
    """The shared products of `members` (int8 layers with the same inputs and all or none with a bias)."""

    def __init__(self, members: list[nn.Module], names: list[str]) -> None:
        self.names = names
        rows = huge_page_empty((sum(m.out_features for m in members), members[0].in_features), torch.int8)
        scale = huge_page_empty((len(rows), members[0].scale.shape[1]), torch.float16)
        self.blocks = Int8Blocks(torch.cat([m.rows for m in members], out=rows),
                                 torch.cat([m.scale for m in members], out=scale))
        biases = [m.bias for m in members]
        self.bias = None if biases[0] is None else torch.cat(biases)
        self.members, self.sizes = members, [m.out_features for m in members]
        self.views: dict[nn.Module, torch.Tensor] = {}
        self._hand_out()
        self.active = True
        self._thread = threading.local()  # per thread (a model called from two at once): the input whose products
        # wait to be taken ("input"), and those products ("waiting")

    def move(self, copy: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Hold the shared rows and scales in `copy`'s copies of them, each member's buffers views of those."""
        self.blocks = Int8Blocks(copy(self.blocks.rows), copy(self.blocks.scale))
        self._hand_out()

    def _hand_out(self) -> None:
        """Make each member's rows and scale its part of the shared blocks (so nothing is held twice)."""
        start = 0
        for member, size in zip(self.members, self.sizes):
            member.rows = nn.Buffer(self.blocks.rows[start:start + size])
            member.scale = nn.Buffer(self.blocks.scale[start:start + size])
            self.views[member] = member._buffers["rows"]
            start += size

    def product(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """`member`'s product of `x` from the call shared with its siblings; None where it computes alone."""
        # up to 90 calls a decode step: each torch call here is counted (a slice costs more than a split)
        if not self.active or torch.compiler.is_compiling():
            return None
        tokens = x.numel() // member.in_features
        if tokens > NATIVE_TOKENS:
            return None
        state = self._thread.__dict__
        waiting = state.get("waiting")
        if member._buffers["rows"] is not self.views[member]:
            self._stop("gave it new weights")
        elif not waiting:
            parts = linear_native.linear(x, self.blocks, self.bias).split_with_sizes(self.sizes, dim=-1)
            if tokens > 1:  # one token's parts are contiguous already
                parts = [part.contiguous() for part in parts]
            state["input"], state["waiting"] = x, dict(zip(self.members, parts))
            return state["waiting"].pop(member)
        elif x is state["input"] and member in waiting:
            return waiting.pop(member)
        else:
            self._stop("called them on different inputs")
        return None

    def _stop(self, why: str) -> None:
        self.active = False
        self._thread.__dict__.clear()
        warnings.warn(f"int8 layers {', '.join(self.names)} read the same inputs until this call, so they were "
                      f"multiplied together; the model {why}: each is multiplied on its own from now on (slower, "
                      f"the same results)", stacklevel=4)


# the layers transformers' decoders call on one input, by name (Llama, Mistral, Qwen, Gemma; Phi-3 stores them fused)
SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def group_siblings(layers: dict[str, nn.Module]) -> int:
    """Give each set of the int8 `layers` (by name in the model) named in one of `SIBLING_NAMES` under one module
    (two or more, with the same inputs and all or none with a bias) one `SiblingProducts`; how many sets."""
    sets = defaultdict(list)
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        for kind, names in enumerate(SIBLING_NAMES):
            if child in names:
                sets[(parent, kind, layer.in_features, layer.bias is None)].append((name, layer))
    groups = [members for members in sets.values() if len(members) > 1]
    for members in groups:
        group = SiblingProducts([layer for _, layer in members], [name for name, _ in members])
        for _, layer in members:
            layer.siblings = group
    return len(groups)
