"""Give the C heap's freed memory back to the system.

The start-up measurement (runner.FastRunner._choose_precisions) runs large prefills in every candidate precision
on the engine's thread and its OpenMP team; glibc keeps what their temporaries freed in each thread's malloc arena
(up to 64 MB apiece) rather than unmapping it, so an idle replica held hundreds of MB it no longer used. Besides
the memory, every resident page is one the kernel must free before a killed executor's sockets close: the gateway
learns of the death only then (gateway/health.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util


def trim() -> None:
    """glibc's malloc_trim(0) over every arena; nothing where the C library is not glibc (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    malloc_trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)
