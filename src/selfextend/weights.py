"""Lighter weights on CPU: a model's linear layers and token embedding stored as float16 or int8, not float32.

A decode step reads every weight once, so on CPU its speed is set by the bytes of weights it reads; a GGUF
expanded to float32 reads 4 bytes per weight. The formats here keep the arithmetic in float32 and store less:

- "float16": weights in half precision (fbgemm's fp16 GEMM; activations stay float32, so nothing overflows);
- "int8": weights in int8 with one scale per output row, each token's activations quantized to 7 bits on
  their own scale (fbgemm's dynamic int8 GEMM, torch's `quantized.linear_dynamic`); the embedding keeps
  int8 rows with a scale per token;
- "dense": the model as loaded.

The fbgemm kernels are torch's own (x86 CPUs); the formats are for CPU inference, and their quality cost is
measured in docs/results.md. This is the one module that knows torch's quantized-op interface.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import UnsupportedModelError
from .identity import IDENTITY_ATTRIBUTE, model_identity

WEIGHT_FORMATS = ("dense", "float16", "int8")
DEFAULT_WEIGHTS = "dense"


def _int8_rows(weight: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (rows / scale, rounded) and each row's float32 scale; in chunks of rows, so a
    large embedding needs no float copy of itself."""
    rows = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0])
    for start in range(0, weight.shape[0], chunk):
        part = weight[start:start + chunk].float()
        scale[start:start + chunk] = part.abs().amax(dim=1).clamp(min=1e-12) / 127
        rows[start:start + chunk] = torch.round(part / scale[start:start + chunk, None]).clamp(-127, 127)
    return rows, scale


class PackedLinear(nn.Module):
    """A linear layer whose weight is held in fbgemm's packed float16 or int8 form; float32 in and out."""

    def __init__(self, linear: nn.Linear, fmt: str) -> None:
        super().__init__()
        self.in_features, self.out_features, self.format = linear.in_features, linear.out_features, fmt
        weight = linear.weight.detach().float()
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.bias = None  # int8 adds its bias after scaling the rows back (see _int8); float16 packs it
        if fmt == "float16":
            self.packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)
        else:
            rows, scale = _int8_rows(weight)
            self.bias = bias
            with warnings.catch_warnings():  # torch deprecates quantized tensors; the pinned torch keeps them
                warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
                quantized = torch._make_per_channel_quantized_tensor(
                    rows, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise TypeError(f"{self.format} weights compute in float32, got {x.dtype} input")
        flat = x.reshape(-1, self.in_features)
        if self.format == "float16":
            out = torch.ops.quantized.linear_dynamic_fp16(flat, self.packed)
        else:
            out = self._int8(flat)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _int8(self, flat: torch.Tensor) -> torch.Tensor:
        """fbgemm's dynamic int8 GEMM with each token's activations quantized on their own scale.

        fbgemm picks one activation range per call, so a token's result would depend on the others in its
        batch (and a chunked prefill would differ from one pass). Each row is divided by its largest magnitude
        and one extra row spans [-1, 1], so the call's range is always [-1, 1]; the rows are scaled back after.
        reduce_range keeps activations to 7 bits, as AVX2's int8 products must fit in 16 bits.
        """
        peak = flat.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(flat.dtype).tiny)
        span = flat.new_zeros(1, self.in_features)
        span[0, 0], span[0, -1] = 1.0, -1.0
        out = torch.ops.quantized.linear_dynamic(torch.cat([flat / peak, span]), self.packed, True)[:-1]
        out = out * peak
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


class CompactEmbedding(nn.Module):
    """A token embedding with rows stored in float16, or int8 with a scale per row, widened when looked up.

    Keeps the multiplier of scaled embeddings (Gemma's `embed_scale`).
    """

    def __init__(self, embedding: nn.Embedding, fmt: str) -> None:
        super().__init__()
        weight = embedding.weight.detach()
        self.num_embeddings, self.embedding_dim, self.format = weight.shape[0], weight.shape[1], fmt
        if fmt == "float16":
            self.rows, self.row_scale = nn.Buffer(weight.half()), None
        else:
            rows, scale = _int8_rows(weight)
            self.rows, self.row_scale = nn.Buffer(rows), nn.Buffer(scale)
        scale = getattr(embedding, "embed_scale", None)
        self.embed_scale = None if scale is None else float(scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = nn.functional.embedding(input_ids, self.rows).float()
        if self.row_scale is not None:
            out = out * self.row_scale[input_ids].unsqueeze(-1)
        return out if self.embed_scale is None else out * self.embed_scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.format}"


def _embedding_supported(module: nn.Embedding) -> bool:
    """Whether `module` looks rows up and at most multiplies them by its `embed_scale` (checked on a few rows)."""
    ids = torch.arange(min(16, module.num_embeddings))
    scale = getattr(module, "embed_scale", None)
    expected = module.weight[ids] * (1.0 if scale is None else float(scale))
    with torch.no_grad():
        return torch.equal(module(ids), expected)


def check_format(fmt: str, device: str = "cpu", dtype: str = "float32") -> None:
    """Refuse a weight format that does not go with the device and compute dtype, before anything loads."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
    if fmt == "dense":
        return
    if torch.device(device).type != "cpu" or dtype != "float32":
        raise ValueError(f"{fmt} weights are for float32 compute on CPU, not {dtype} on {device}: "
                         f"use --weights dense there")
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        raise ValueError(f"{fmt} weights need torch's x86 (fbgemm) kernels; this CPU has the "
                         f"{torch.backends.quantized.engine!r} engine: use --weights dense")


def compress(model: nn.Module, fmt: str) -> nn.Module:
    """Store `model`'s linear layers and input embedding in `fmt` (in place; "dense" leaves it as it is).

    Every nn.Linear becomes a PackedLinear (a tied LM head too: it gets its own packed copy) and the input
    embedding a CompactEmbedding; the float32 weights are released. The model keeps the identity of its dense
    weights (so their calibrated profile). A CPU float32 model only.
    """
    parameter = next(model.parameters())
    check_format(fmt, str(parameter.device), str(parameter.dtype).removeprefix("torch."))
    if fmt == "dense":
        return model
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding) or not _embedding_supported(embedding):
        raise UnsupportedModelError(f"{type(embedding).__name__} is not an embedding {fmt} weights support: "
                                    f"use --weights dense")
    identity = model_identity(model)  # the profile measured on the dense weights stays this model's
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, module in targets:
        _replace(model, name, PackedLinear(module, fmt))
    model.set_input_embeddings(CompactEmbedding(embedding, fmt))
    _own_memory(model)
    setattr(model, IDENTITY_ATTRIBUTE, identity)
    return model


def _own_memory(model: nn.Module) -> None:
    """Copy the tensors left (norms, biases) out of the loaded file's memory map, so that the map, whose pages
    the packing read and which count in the process's memory while it is open, is closed."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CompactEmbedding):
                continue  # made here, not mapped: copying it would only double it for a moment
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                tensor.data = tensor.data.clone()


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
