"""Benchmarks and long-running checks; run from the repo root as `python -m scripts.NAME`."""
