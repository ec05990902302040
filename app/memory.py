"""Give the heap freed after a load back to the operating system.

A load decodes every stored item (SQL rows, derived-data blobs, JSON) into short-lived
Python and numpy objects. glibc keeps what they freed in its arenas, so the process stays
as large as at its peak. Measured with scripts/bench_load_rss.py (a first load of a SQLite
gallery, no ANN index): 6.45 -> 5.35 KB of RSS per item at 50k items, 5.53 -> 5.22 KB at
200k (arrays: 4.98 / 4.83 KB per item).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from functools import cache

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks from this size up get their own mapping, which goes back to the OS when freed.
# glibc starts at 128 KiB but raises the threshold to the size of every larger mapped block
# freed (up to 32 MiB); a search's temporaries of some MB (contenders re-embedded, rows of
# scores, batches) then come from the heap and stay there, freed but resident. Fixing the
# thresholds turns that adjustment off: after all the searches of
# scripts/bench_rss_stages.py at 200k items RSS was 929 MB with them, 967 MB without (895
# both once trimmed). Not lower: at 256 KiB the 1.7 MB of Gram rows a knn query gathers
# were mapped and page-faulted anew each time, doubling its in-process time (1.1 -> 2.3 ms;
# at 4 MiB 1.0 ms, as with glibc's default).
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 8 << 20


@cache
def _libc_function(name: str) -> Callable[..., int] | None:
    """A glibc function, or None where the C library has none (musl, macOS)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Collect garbage, then ask glibc to return free heap pages; a no-op without glibc."""
    gc.collect()
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(ctypes.c_size_t(0))


def keep_freed_memory_small() -> None:
    """Fix glibc's mmap and trim thresholds for this process (a service or a shard calls it
    once at start); a no-op without glibc."""
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(MMAP_THRESHOLD))
        mallopt(ctypes.c_int(_M_TRIM_THRESHOLD), ctypes.c_int(TRIM_THRESHOLD))
