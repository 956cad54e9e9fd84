"""Lighter weights on CPU: a model's linear layers and token embedding stored as float16 or int8, not float32.

A decode step reads every weight once, so on CPU its speed is set by the bytes of weights it reads; a GGUF
expanded to float32 reads 4 bytes per weight. The formats here keep the arithmetic in float32 and store less:

- "float16": weights in half precision (fbgemm's fp16 GEMM; activations stay float32, so nothing overflows);
- "int8": weights in int8 in blocks of 32 inputs with a float16 scale each (llama.cpp's Q8_0 layout, for the
  weights only), multiplied in float32 by the project's C kernel (`linear_native`); the embedding looks its
  rows up in the same form, and a tied LM head shares them. The RMSNorm layers run in C too (`norm_native`),
  and a decode step's RoPE (`rope_native`): with the weights' bytes cut, a decode step's many small torch
  operations are the next cost;
- "dense": the model as loaded.

fbgemm is torch's own (x86 CPUs); the int8 kernel is built with the system's C compiler on first use. The
formats are for CPU inference; their quality cost is measured in docs/results.md.
"""

from __future__ import annotations

import mmap
import warnings

import torch
from torch import nn

from . import linear_native
from . import norm_native
from . import rope_native
from .allocator import HUGE_PAGE, SharedHugePages, advise
from .errors import NativeBuildError, UnsupportedModelError
from .identity import IDENTITY_ATTRIBUTE, model_identity
from .linear_native import Int8Blocks
from .sibling_products import SiblingProducts, group_siblings

WEIGHT_FORMATS = ("dense", "float16", "int8")
AUTO = "auto"  # int8 where it runs (CPU, float32 compute, a C compiler to build its kernel), else dense


def choose_format(requested: str, device: str = "cpu", dtype: str = "float32") -> tuple[str, str | None]:
    """The weight format to load for `requested` (one of WEIGHT_FORMATS, or "auto"), and for "auto" on a CPU
    where int8 cannot be built, what the user loses and how to get it back (None otherwise)."""
    if requested != AUTO:
        return requested, None
    try:
        check_format("int8", device, dtype)
    except ValueError:  # not a CPU with float32 compute: dense is the rule there, not a loss
        return "dense", None
    except NativeBuildError as error:
        return "dense", (f"loading dense float32 weights, which decode about 2x slower and take more memory than "
                         f"int8: {error} (--weights dense says this is what you want)")
    return "int8", None


class PackedLinear(nn.Module):
    """A linear layer whose weight is held in fbgemm's packed float16 form or as int8 blocks; float32 in and out.

    `blocks`: int8 weights made elsewhere (a tied embedding's), shared instead of quantized again.
    """

    def __init__(self, linear: nn.Linear, fmt: str, blocks: Int8Blocks | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.format = linear.in_features, linear.out_features, fmt
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach().float().clone()  # not the file's map
        self.bias = None  # float16 packs its bias; int8 adds it after the product
        if fmt == "float16":
            self.packed = torch.ops.quantized.linear_prepack_fp16(weight.float(), bias)
        else:
            blocks = blocks if blocks is not None else Int8Blocks.quantize(weight)
            self.rows, self.scale, self.bias = nn.Buffer(blocks.rows), nn.Buffer(blocks.scale), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise TypeError(f"{self.format} weights compute in float32, got {x.dtype} input")
        if self.format == "int8":
            siblings = self.siblings
            out = None if siblings is None else siblings.product(self, x)
            return out if out is not None else linear_native.linear(x, self._blocks(), self.bias)
        flat = x.reshape(-1, self.in_features)
        return torch.ops.quantized.linear_dynamic_fp16(flat, self.packed).reshape(*x.shape[:-1], self.out_features)

    _checked: Int8Blocks | None = None
    siblings: SiblingProducts | None = None  # layers of the same parent reading the same inputs (int8)

    def _blocks(self) -> Int8Blocks:
        """The int8 buffers as `Int8Blocks`, checked once, not at every call (again if a move replaced them)."""
        buffers, checked = self._buffers, self._checked  # not nn.Module's attribute lookup: 127 calls a step
        if checked is None or checked.rows is not buffers["rows"] or checked.scale is not buffers["scale"]:
            checked = self._checked = Int8Blocks(buffers["rows"], buffers["scale"])
        return checked

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


class CompactEmbedding(nn.Module):
    """A token embedding with rows stored in float16 or as int8 blocks, widened when looked up.

    Keeps the multiplier of scaled embeddings (Gemma's `embed_scale`). `blocks`: int8 rows made elsewhere.
    """

    def __init__(self, embedding: nn.Embedding, fmt: str, blocks: Int8Blocks | None = None) -> None:
        super().__init__()
        weight = embedding.weight.detach()
        self.num_embeddings, self.embedding_dim, self.format = weight.shape[0], weight.shape[1], fmt
        if fmt == "float16":
            self.rows, self.scale = nn.Buffer(weight.half()), None
        else:
            blocks = blocks if blocks is not None else Int8Blocks.quantize(weight)
            self.rows, self.scale = nn.Buffer(blocks.rows), nn.Buffer(blocks.scale)
        scale = getattr(embedding, "embed_scale", None)
        self.embed_scale = None if scale is None else float(scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            out = nn.functional.embedding(input_ids, self.rows).float()
        else:
            out = Int8Blocks(self.rows, self.scale).lookup(input_ids)
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
    if fmt == "int8":
        linear_native.library()  # built here, or a NativeBuildError that says why, before anything loads
        norm_native.library()
        rope_native.library()
    elif torch.backends.quantized.engine not in ("x86", "fbgemm"):
        raise ValueError(f"{fmt} weights need torch's x86 (fbgemm) kernels; this CPU has the "
                         f"{torch.backends.quantized.engine!r} engine: use --weights dense")


def compress(model: nn.Module, fmt: str) -> nn.Module:
    """Store `model`'s linear layers and input embedding in `fmt` (in place; "dense" leaves it as it is).

    Every nn.Linear becomes a PackedLinear and the input embedding a CompactEmbedding; an LM head tied to the
    embedding shares its int8 blocks (float16: it gets its own packed copy). The float32 weights are released.
    Int8 layers of one module that read the same inputs are multiplied together in a decode step
    (`sibling_products`).
    With int8, RMSNorm layers become `norm_native.NativeNorm`s (a warning names any it does not recognise) and a
    decode step's RoPE runs in C (`rope_native`; a warning counts the layers whose form it does not recognise).
    The model keeps the identity of its dense weights (so their calibrated profile). A CPU float32 model only.
    """
    parameter = next(model.parameters())
    check_format(fmt, str(parameter.device), str(parameter.dtype).removeprefix("torch."))
    if fmt == "dense":
        return model
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding) or not _embedding_supported(embedding):
        raise UnsupportedModelError(f"{type(embedding).__name__} is not an embedding {fmt} weights support: "
                                    f"use --weights dense")
    pages = _FilePages()
    # the profile measured on the dense weights stays this model's; its samples fault in pages of every weight
    identity = model_identity(model, done=pages.release)
    head = model.get_output_embeddings()
    tied = isinstance(head, nn.Linear) and head.weight.data_ptr() == embedding.weight.data_ptr()
    shared = Int8Blocks.quantize(embedding.weight.detach(), done=pages.release) if fmt == "int8" else None
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    own = {}  # int8 layers with their own blocks (not the embedding's)
    for name, module in targets:
        packed = PackedLinear(module, fmt, shared if tied and module is head else None)
        _replace(model, name, packed)
        pages.release(module.weight)
        if fmt == "int8" and not (tied and module is head):
            own[name] = packed
    group_siblings(own)
    model.set_input_embeddings(CompactEmbedding(embedding, fmt, shared))
    pages.release(embedding.weight)
    _own_memory(model)
    if fmt == "int8":
        _share_huge_pages(model)
        unrecognised = norm_native.fuse_norms(model)
        if unrecognised:
            warnings.warn(f"int8 weights run RMSNorm in C, but {len(unrecognised)} norm layers of "
                          f"{type(model).__name__} ({unrecognised[0]}, ...) compute a form it does not recognise: "
                          f"they run in torch, which slows decoding", stacklevel=2)
        _, other_rope = rope_native.fuse_rotary(model)
        if other_rope:
            warnings.warn(f"int8 weights run a decode step's RoPE in C, but {other_rope} attention layers of "
                          f"{type(model).__name__} rotate in a form it does not recognise: they run in torch, "
                          f"which slows decoding", stacklevel=2)
    setattr(model, IDENTITY_ATTRIBUTE, identity)
    return model


class _FilePages:
    """Drops the pages of a weight read from a file mapping (a checkpoint loaded as a memory map) from this
    process's memory once it has been packed, so that packing a model never holds the whole file: they stay in
    the page cache, and a later read faults them in again from the file. Only where every page of the weight is
    still the file's (none copied on write, per /proc/self/pagemap); other memory is left alone. Linux only;
    elsewhere nothing is released and the peak is only higher."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split()
                    if len(fields) >= 6 and fields[5].startswith("/"):
                        self.ranges.append(tuple(int(x, 16) for x in fields[0].split("-")))
        except OSError:
            self.ranges = []

    def release(self, tensor: torch.Tensor) -> None:
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not any(low <= start and end <= high for low, high in self.ranges):
            return
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor
        if last > first and self._all_from_the_file(first, last):
            advise(first, last - first, mmap.MADV_DONTNEED)

    @staticmethod
    def _all_from_the_file(first: int, last: int) -> bool:
        """No page in [first, last) is anonymous (copied on write, or swapped): each is absent or the file's."""
        page = mmap.PAGESIZE
        try:
            with open("/proc/self/pagemap", "rb") as pagemap:
                pagemap.seek(first // page * 8)
                entries = torch.frombuffer(bytearray(pagemap.read((last - first) // page * 8)), dtype=torch.int64)
        except OSError:
            return False
        in_memory = (entries < 0) | ((entries >> 62) & 1).bool()  # bit 63: present; 62: swapped
        from_file = ((entries >> 61) & 1).bool()
        return bool((from_file | ~in_memory).all())


def _own_memory(model: nn.Module) -> None:
    """Copy the tensors left (norms, biases) out of the loaded file's memory map, so that the map, whose pages
    the packing read and which count in the process's memory while it is open, is closed."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (CompactEmbedding, PackedLinear)):
                continue  # made here, not mapped (and maybe shared): copying would only double them
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                tensor.data = tensor.data.clone()


def _share_huge_pages(model: nn.Module) -> None:
    """Copy the int8 rows and scales of every layer and of the embedding into one huge-page mapping, but tensors
    of 2 MB or more, which have huge pages of their own (`huge_page_empty`). Most of a decode step's weights are
    smaller (Gemma 3 270M: every layer's q/k/v, o and down rows, every scale) and read once a step each; in 4 KB
    pages each read misses the TLB every 4 KB (docs/results.md, session 34: a 16K step 1.06x faster)."""
    modules = [m for m in model.modules() if isinstance(m, (PackedLinear, CompactEmbedding))
               and isinstance(m._buffers.get("scale"), torch.Tensor) and m._buffers["rows"].dtype == torch.int8]
    groups = list({id(m.siblings): m.siblings for m in modules if getattr(m, "siblings", None) is not None}.values())
    alone = [m for m in modules if getattr(m, "siblings", None) is None]

    def key(t: torch.Tensor) -> tuple:
        return t.data_ptr(), t.dtype, tuple(t.shape)

    small = {}  # the tensors to move, once each (a tied LM head shares the embedding's)
    for tensor in [t for g in groups for t in (g.blocks.rows, g.blocks.scale)] + \
            [m._buffers[name] for m in alone for name in ("rows", "scale")]:
        if tensor.nbytes < HUGE_PAGE:
            small.setdefault(key(tensor), tensor)
    if not small:
        return
    pages = SharedHugePages(SharedHugePages.room(list(small.values())))
    moved = {k: pages.copy(tensor) for k, tensor in small.items()}

    def copy(tensor: torch.Tensor) -> torch.Tensor:
        return moved.get(key(tensor), tensor)

    for group in groups:
        group.move(copy)
    for module in alone:
        module.rows, module.scale = nn.Buffer(copy(module.rows)), nn.Buffer(copy(module.scale))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
