"""The long hostile-input run for docs/reliability.md: 20,000+ generated requests against a
real `cdpae serve` on 127.0.0.1 (both API keys configured), from the service's own OpenAPI
schema (schemathesis, positive and negative) and a bundle-aware hypothesis strategy.

    python -m scripts.fuzz_long --scale 1.0

Prints the request count by status and every problem (a 5xx, a non-JSON or non-contract error
body, a 422 without its field, NaN in a body, an acknowledged item that can't be read back).
Exit code 1 on any problem. tests/test_reliability_fuzz.py runs the same checks in-process
with ~1,350 requests.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import httpx

from tests.support.reliability_fuzz import (
    READ_KEY,
    WRITE_KEY,
    FuzzReport,
    fuzz_schema,
    fuzz_semantic,
)
from tests.support.service import Server
from tests.support.synthetic import write_synthetic_bundle

# schemathesis examples per operation at --scale 1
BUDGET = {
    "POST /search/image-to-text": 3000,
    "POST /search/text-to-image": 3000,
    "PUT /gallery/{modality}/items": 3500,
    "GET /gallery/{modality}/items/{item_id}": 1500,
    "DELETE /gallery/{modality}/items/{item_id}": 1500,
    "GET /gallery/{modality}": 800,
}
SEMANTIC_EXAMPLES = 5000  # ~1.4 requests each


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, help="bundle to serve (default: a synthetic one)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every example budget")
    p.add_argument("--seed", type=int, default=20261127)
    args = p.parse_args(argv)
    os.environ["CDPAE_API_KEY"] = WRITE_KEY
    os.environ["CDPAE_READ_API_KEY"] = READ_KEY
    with tempfile.TemporaryDirectory(prefix="cdpae-fuzz-") as tmp_name:
        tmp = Path(tmp_name)
        bundle = args.bundle or write_synthetic_bundle(tmp / "bundle")
        server = Server(bundle, tmp / "data", tmp / "server.log", "--log-level", "warning")
        report = FuzzReport()
        started = time.monotonic()
        try:
            server.wait_ready()
            with httpx.Client(base_url=server.url, timeout=30) as http:
                dims = {
                    m: http.get(
                        f"/gallery/{m}", headers={"Authorization": f"Bearer {READ_KEY}"}
                    ).json()["dim"]
                    for m in ("image", "text")
                }
                fuzz_schema(
                    http,
                    lambda method, path: int(args.scale * BUDGET.get(f"{method} {path}", 100)),
                    report,
                    stop_on_problem=False,
                    seed=args.seed,
                )
                print(f"schema fuzz: {report.summary()}", flush=True)
                fuzz_semantic(
                    http,
                    dims,
                    int(args.scale * SEMANTIC_EXAMPLES),
                    report,
                    stop_on_problem=False,
                    seed=args.seed,
                )
            alive = server.proc.poll() is None
        finally:
            server.stop()
        elapsed = time.monotonic() - started
        log = (tmp / "server.log").read_text()
    print(f"total: {report.summary()} in {elapsed:.0f} s; server alive at the end: {alive}")
    print(f"server log: {log.count('Traceback')} tracebacks, {log.count(' 500 ')} 500 lines")
    for line in report.failures[:30]:
        print("  PROBLEM", line)
    return 1 if report.failures or not alive or "Traceback" in log else 0


if __name__ == "__main__":
    raise SystemExit(main())
