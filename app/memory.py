"""Give the heap freed after a load back to the operating system.

A load decodes every stored item (SQL rows, derived-data blobs, JSON) into short-lived
Python and numpy objects. glibc keeps what they freed in its arenas, so the process stays
as large as at its peak. Measured with scripts/bench_load_rss.py (a first load of a SQLite
gallery, no ANN index): 6.45 -> 5.35 KB of RSS per item at 50k items, 5.53 -> 5.22 KB at
200k (arrays: 4.98 / 4.83 KB per item).

glibc's adjusting mmap/trim thresholds are left alone on purpose: fixing them (mallopt, at
4 / 8 MiB) left RSS 47 MB smaller after the searches of scripts/bench_rss_stages.py at
200k items, but an exact cosine query there then took 22.4 ms instead of 15.8 (side by
side, one core each): what is not kept resident is page-faulted again by the next query.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


def release_freed_memory() -> None:
    """Collect garbage, then ask glibc to return free heap pages; a no-op without glibc."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
