"""app.memory: freed heap is given back to the operating system."""

import os
import sys
import time

import numpy as np
import pytest

from app.bundle import load_bundle
from app.memory import IdleTrimmer, release_freed_memory
from scripts.bench_service import rss_bytes


def _rss_mb() -> float:
    return rss_bytes(os.getpid()) / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, needs glibc")
def test_freed_heap_goes_back_after_release():
    # Many blocks above pymalloc's 512-byte limit come from malloc; one kept at the end of
    # the heap stops glibc from trimming it by itself, as a load's long-lived rows do.
    blocks = [bytes(2000) + bytes([i % 256]) for i in range(150_000)]
    keep = bytes(2000) + b"kept"
    peak = _rss_mb()
    del blocks
    freed_but_kept = _rss_mb()
    release_freed_memory()
    released = _rss_mb()
    assert keep.endswith(b"kept")
    assert freed_but_kept - released > 100, (peak, freed_but_kept, released)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, needs glibc")
def test_a_large_embedding_run_leaves_no_memory_behind(synthetic_bundle):
    """onnxruntime's arena would keep what its largest run needed for good (260 MB after
    one batch of cosine queries at 200k items): the encoders run without it."""
    bundle = load_bundle(synthetic_bundle)
    rows = (64 << 20) // (4 * bundle.manifest.common_dim)  # a 64 MB output
    features = np.random.default_rng(0).normal(size=(rows, bundle.manifest.input_dims["text"]))
    before = _rss_mb()
    units = bundle.embed("text", features)
    held = units.nbytes / 2**20
    del units
    release_freed_memory()
    after = _rss_mb()
    assert after - before < held / 4, (before, after, held)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, needs glibc")
def test_the_idle_trimmer_gives_the_heap_back_only_once_the_service_is_idle():
    activity = {"in_flight": 1, "admitted": 1}
    trimmer = IdleTrimmer(lambda: (activity["in_flight"], activity["admitted"]), idle_s=0.1)
    trimmer.start()
    try:
        blocks = [bytes(2000) + bytes([i % 256]) for i in range(150_000)]
        keep = bytes(2000) + b"kept"  # stops glibc from trimming by itself (test above)
        del blocks
        time.sleep(0.4)
        assert trimmer.trims == 0  # a request in flight the whole time
        activity["in_flight"] = 0
        for _ in range(30):  # requests admitted between any two polls: busy, none in flight
            activity["admitted"] += 1
            time.sleep(0.01)
        assert trimmer.trims == 0
        freed_but_kept = _rss_mb()
        time.sleep(0.6)  # idle now
        released = _rss_mb()
        assert trimmer.trims == 1  # once per busy spell, not at every idle poll
        assert freed_but_kept - released > 100, (freed_but_kept, released)
        assert keep.endswith(b"kept")
    finally:
        trimmer.stop()
    assert not trimmer._thread.is_alive()
