"""Give the heap freed after a load back to the operating system.

A load decodes every stored item (SQL rows, derived-data blobs, JSON) into short-lived
Python and numpy objects. glibc keeps what they freed in its arenas, so the process stays
as large as at its peak. Measured with scripts/bench_load_rss.py (a first load of a SQLite
gallery, no ANN index): 6.45 -> 5.35 KB of RSS per item at 50k items, 5.53 -> 5.22 KB at
200k (arrays: 4.98 / 4.83 KB per item).

A serving process frees the same way after searches: a batch of 256 cosine queries leaves
~35 MB in glibc's free lists at 200k items (scripts/bench_rss_stages.py), held until the
next trim. `IdleTrimmer` gives it back once the service has been idle for a while, so an
idle replica is as small as its data, and no request pays for the trim.

glibc's adjusting mmap/trim thresholds are left alone on purpose: fixing them (mallopt, at
4 / 8 MiB) left RSS 47 MB smaller after the searches of scripts/bench_rss_stages.py at
200k items, but an exact cosine query there then took 22.4 ms instead of 15.8 (side by
side, one core each): what is not kept resident is page-faulted again by the next query.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from collections.abc import Callable
from functools import cache

log = logging.getLogger("cdpae.memory")


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


def release_freed_memory(collect: bool = True) -> None:
    """Collect garbage (unless `collect` is False), then ask glibc to return free heap pages;
    a no-op without glibc."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class IdleTrimmer:
    """A daemon thread that trims the heap once no request has run for `idle_s` seconds.

    `activity()` gives (requests in flight, requests admitted so far). A poll every `idle_s`
    sees the service idle when nothing is in flight and nothing was admitted since the
    previous poll; it trims then, once per busy spell (an idle service is not trimmed
    again and again). A request that arrives during a trim waits for glibc's arena lock,
    a few milliseconds at worst (`last_trim_s` says how long the last one took).
    """

    def __init__(self, activity: Callable[[], tuple[int, int]], idle_s: float) -> None:
        self.activity = activity
        self.idle_s = idle_s
        self.trims = 0
        self.last_trim_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idle-trimmer", daemon=True)

    def start(self) -> None:
        if _malloc_trim() is not None:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        seen = trimmed_at = self.activity()[1]
        while not self._stop.wait(self.idle_s):
            in_flight, admitted = self.activity()
            if in_flight == 0 and admitted == seen and admitted != trimmed_at:
                started = time.perf_counter()
                release_freed_memory(collect=False)  # searches free arrays, not cycles
                self.last_trim_s = time.perf_counter() - started
                self.trims += 1
                trimmed_at = admitted
                log.debug("idle: heap trimmed in %.1f ms", 1e3 * self.last_trim_s)
            seen = admitted
