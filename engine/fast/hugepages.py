"""CPU tensors on transparent huge pages, for the memory a decode step streams through: packed weights and the KV
cache.

Why: a step reads every weight once (hundreds of MB) and every row's cached keys and values. With 4 KB pages
that is tens of thousands of TLB misses a step, each a page walk, and a slow one under a hypervisor (two-level
page tables); 2 MB pages cut that by 512 (bench/levers.md, "Earlier measurements").

Linux gives huge pages to anonymous memory in "madvise" mode (the common default) only where asked with
madvise(MADV_HUGEPAGE), which torch's allocator does not do. An Arena maps its own chunks, asks, and carves
tensors from them; a chunk is unmapped when the last tensor carved from it is freed. Elsewhere (no
MADV_HUGEPAGE, THP off) the same memory is plain pages: nothing else changes.
"""

from __future__ import annotations

import mmap

import torch

HUGE_PAGE = 2 << 20
CHUNK = 64 << 20  # bytes a chunk holds at least: a precision's weights fill few chunks, the last one part-used
ALIGNMENT = 64  # a cache line: every tensor starts on one


class Arena:
    """A bump allocator of CPU tensors. Tensors live as long as anything references them; their chunk with them."""

    def __init__(self) -> None:
        self._chunk: torch.Tensor | None = None  # uint8, starting on a huge-page boundary
        self._used = 0

    def empty(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if self._chunk is None or self._used + nbytes > self._chunk.numel():
            self._chunk, self._used = _mapped(max(nbytes, CHUNK)), 0
        start = self._used
        self._used = -(-(start + nbytes) // ALIGNMENT) * ALIGNMENT
        return self._chunk[start : start + nbytes].view(dtype).view(shape)

    def zeros(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Without writing a byte: an arena hands out each byte of its fresh anonymous mappings once, and the
        kernel gives such pages zeroed on first touch (so a large buffer costs memory only where it is used)."""
        return self.empty(shape, dtype)

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.empty(tensor.shape, tensor.dtype).copy_(tensor)


def _mapped(nbytes: int) -> torch.Tensor:
    """An anonymous mapping of at least nbytes from a huge-page boundary, advised to use huge pages: uint8.
    The tensor keeps the mapping alive (torch.frombuffer holds the buffer)."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    buffer = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(buffer, dtype=torch.uint8)
    offset = -raw.data_ptr() % HUGE_PAGE
    return raw[offset : offset + size]
