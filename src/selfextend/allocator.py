"""Memory from the system in huge pages, and freed memory given back where the C library holds it (glibc).

A decode step streams every int8 weight from memory once. In 4 KB pages that is a TLB miss every 4 KB, and on a
virtual machine each miss walks two page tables: the LM head (262144 × 640 int8) took 10.4-10.7 ms a read against
7.6-8.6 ms from 2 MB pages (`benchmarks/huge_pages.py`; docs/results.md, session 32). `huge_page_empty` asks Linux
for transparent huge pages (`madvise(MADV_HUGEPAGE)`, honoured where /sys/kernel/mm/transparent_hugepage/enabled is
`always` or `madvise`).
Tensors under 2 MB cannot fill a huge page of their own: `SharedHugePages` copies many into one such mapping (a
model's small int8 weights: a 16K step 1.06x faster; docs/results.md, session 34).

glibc keeps memory a program frees inside its heaps for reuse, so resident memory stays at its high-water mark:
parsing a 262K-entry tokenizer frees about 0.3 GB that stays resident, a 2048-token prefill chunk leaves its
intermediates' pages behind. `return_freed_memory` asks glibc (`malloc_trim`) to release those pages; other C
libraries return memory their own way, and there it does nothing. The pages go, but the holes stay in the heap's
address space (the tokenizer's: 355 MB among 194 MB still in use), and glibc serves a request from a hole before
anything else: each prefill chunk's temporaries fault their pages back in. Trimming after every chunk costs a
40K prefill up to about 5% of its speed and keeps its peak 10-40 MB lower (docs/results.md, session 36).
`map_large_allocations` sets glibc's threshold for a mapping of its own at 4 MB, for blocks that find no hole (the
tokenizer's large ones while it parses: its peak 0.87 GB against 0.92, session 35), and stops glibc from raising
it as large blocks are freed. The CLI sets it; a 40K main job's peak, set in its prefill, moved within its
run-to-run spread (1.10-1.14 GB against 1.11-1.15 without, session 36).
A library does not: in a heap without holes every large temporary becomes a new mapping, faulted in at each use
(a 16K prefill 10-18% slower). `advise` gives madvise(2) advice on memory no Python mapping owns (weights.py drops a
packed weight's pages of a file mapping with it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap

import torch

HUGE_PAGE = 2 << 20  # x86-64's and most aarch64 kernels' transparent huge page
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only


@functools.cache
def _libc_function(name: str):
    """The C library's function `name` (errno kept), or None where the library or the function is missing."""
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library, use_errno=True), name) if library else None
    except (OSError, AttributeError):
        return None


def advise(address: int, length: int, advice: int) -> bool:
    """madvise(2) over [address, address + length) of memory no Python mapping owns (a file mapping torch made):
    whether the kernel took the advice. False where the C library has no madvise."""
    madvise = _libc_function("madvise")
    return madvise is not None and madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), advice) == 0


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose pages the kernel is asked to make huge (2 MB) when first written: its own
    anonymous mapping, 2 MB-aligned, unmapped when the last tensor over it goes. Tensors under one huge page, and
    systems without the advice (not Linux), get `torch.empty`."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if nbytes < HUGE_PAGE or _MADV_HUGEPAGE is None:
        return torch.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    offset = -ctypes.addressof(ctypes.c_char.from_buffer(region)) % HUGE_PAGE
    try:  # whole huge pages only: a partial last one would be faulted in whole (up to 2 MB more resident)
        region.madvise(_MADV_HUGEPAGE, offset, nbytes - nbytes % HUGE_PAGE)
    except OSError:  # refused (EINVAL) where THP is off: 4 KB pages, what torch.empty would give
        pass
    flat = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset)  # holds `region` open
    return flat.view(dtype).view(shape)


class SharedHugePages:
    """One huge-page mapping of `nbytes` that tensors are copied into one after another, each 64-byte aligned: small
    tensors read together (a decode step's weights under 2 MB each) share huge pages instead of each sitting in
    4 KB pages of its own."""

    ALIGN = 64  # a cache line

    def __init__(self, nbytes: int) -> None:
        self.flat, self.used = huge_page_empty((nbytes,), torch.uint8), 0

    @classmethod
    def _aligned(cls, nbytes: int) -> int:
        return -(-nbytes // cls.ALIGN) * cls.ALIGN

    @classmethod
    def room(cls, tensors: list[torch.Tensor]) -> int:
        """The bytes `tensors` take here, aligned."""
        return sum(cls._aligned(t.nbytes) for t in tensors)

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of `tensor` in these pages."""
        start, nbytes = self.used, tensor.nbytes
        if start + nbytes > len(self.flat):
            raise ValueError(f"{nbytes} bytes do not fit: {len(self.flat) - start} of {len(self.flat)} left")
        out = self.flat[start:start + nbytes].view(tensor.dtype).view(tensor.shape)
        out.copy_(tensor)
        self.used = start + self._aligned(nbytes)
        return out


M_MMAP_THRESHOLD = -3  # mallopt(3)'s parameter number (glibc's malloc.h)
LARGE_ALLOCATION = 4 << 20


def map_large_allocations(threshold: int = LARGE_ALLOCATION) -> bool:
    """Have the C library map every allocation of `threshold` bytes or more that no free block of its heap can
    hold, unmapped when freed, and keep that threshold (glibc's `mallopt`; it otherwise rises as large blocks are
    freed); whether it took the setting. A process-wide policy that the CLI sets: in a heap with no holes to reuse,
    each large temporary is then a new mapping faulted in page by page (module docstring)."""
    mallopt = _libc_function("mallopt")
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold) == 1


def return_freed_memory() -> bool:
    """Release the pages of freed memory the C library still holds; whether it could (glibc only)."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True
