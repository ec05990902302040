"""Crash-safety run for docs/reliability.md: many SIGKILLs of a real `cdpae serve` while upserts
and deletes stream in, on an ordinary directory and on a nearly full 2 MB tmpfs.

    python -m scripts.crash_test --kills 25 --full-disk-kills 20

Each round: start the server on the same data directory, check every id against the ledger
of acknowledged writes (GET + a filtered search + counts + SQLite integrity_check), stream
writes from two threads, SIGKILL at a random moment. Exit code 1 if anything was lost.
(tests/test_reliability_crash.py runs the same harness with fewer kills.)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tqdm import tqdm

from tests.support.reliability_crash import (
    CrashReport,
    MountRefused,
    fill,
    run_crash_rounds,
    small_tmpfs,
)
from tests.support.synthetic import write_synthetic_bundle


def _rounds(label: str, kills: int, **kwargs: object) -> bool:
    """Run the rounds with a progress bar, print the report; True if anything was lost."""
    bar = tqdm(total=kills + 1, desc=label, unit="start")

    def progress(round_no: int, report: CrashReport) -> None:
        bar.update(1)
        bar.set_postfix(acked=report.acked_upserts, problems=len(report.problems))

    report = run_crash_rounds(kills=kills, progress=progress, **kwargs)  # type: ignore[arg-type]
    bar.close()
    print(f"{label}: {report.summary()}")
    for line in report.problems[:20]:
        print("  PROBLEM", line)
    return bool(report.problems)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, help="bundle to serve (default: a synthetic one)")
    p.add_argument("--kills", type=int, default=25, help="SIGKILLs on an ordinary directory")
    p.add_argument(
        "--full-disk-kills", type=int, default=20, help="SIGKILLs on a nearly full tmpfs (root)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    failed = False
    with tempfile.TemporaryDirectory(prefix="cdpae-crash-") as tmp_name:
        tmp = Path(tmp_name)
        bundle = args.bundle or write_synthetic_bundle(tmp / "bundle")
        if args.kills:
            failed |= _rounds(
                "ordinary disk",
                args.kills,
                bundle=bundle,
                data_dir=tmp / "data",
                log_dir=tmp / "logs",
                seed=args.seed,
            )
        if args.full_disk_kills:
            try:
                with small_tmpfs(tmp / "disk") as mount:
                    failed |= _rounds(
                        "nearly full disk (2 MB tmpfs, 200 kB left)",
                        args.full_disk_kills,
                        bundle=bundle,
                        data_dir=mount / "data",
                        log_dir=tmp / "logs-full",
                        seed=args.seed + 1,
                        disk_full_ok=True,
                        after_first_start=lambda: fill(mount, 200_000),
                        max_write_seconds=1.5,
                    )
            except MountRefused as exc:
                print(f"nearly full disk: skipped, can't mount tmpfs ({exc})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
