"""`cdpae serve`: verify the bundle, then run the service with uvicorn.

A bundle that is missing a file or fails its checksum stops here with one line
on stderr naming the file (exit code 2), before uvicorn starts.
"""

from __future__ import annotations

import os

# One BLAS thread per request thread: concurrency comes from requests, and OpenBLAS's own
# threads spin against them on a small machine (exact knn at 10k items: 16 ms -> 6 ms on 2
# busy cores). Must be set before numpy loads; an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

import uvicorn

from app.bundle import BundleError, load_bundle
from app.engine import Engine
from app.main import create_app
from app.metrics import RequestIdFilter
from app.settings import Settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cdpae serve",
        description="Serve a bundle over HTTP. Every option can also be set as an environment "
        "variable CDPAE_<NAME> (e.g. CDPAE_BUNDLE, CDPAE_PORT); flags win.",
    )
    p.add_argument("--bundle", type=Path, help="bundle directory (CDPAE_BUNDLE)")
    p.add_argument("--host", help="interface to bind (CDPAE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (CDPAE_PORT, default 8000)")
    p.add_argument("--data-dir", type=Path, help="gallery store directory (CDPAE_DATA_DIR)")
    p.add_argument(
        "--store",
        help="postgresql://USER@HOST:PORT/DB to keep the gallery in PostgreSQL, shared by "
        "replicas (CDPAE_STORE; default: the SQLite file under --data-dir)",
    )
    p.add_argument(
        "--ray",
        help="ADDRESS of a Ray cluster (host:port) to shard the galleries on, or `local` to "
        "start a one-node Ray (CDPAE_RAY; needs --store postgresql://...)",
    )
    p.add_argument("--shards", type=int, help="shard actors per modality (CDPAE_SHARDS, default 4)")
    p.add_argument(
        "--print-example", action="store_true", help="print a ready-to-paste curl query once ready"
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return p


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    root = logging.getLogger("cdpae")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def example_curl(engine: Engine, settings: Settings) -> str:
    """A curl command searching the text gallery with a real image vector of the gallery."""
    item = engine.example_item("image")
    dim = engine.input_dim("image")
    vector = item.vector.tolist() if item else [0.0] * dim
    body = json.dumps({"vectors": [vector], "top_k": 5, "similarity": "knn"})
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    auth = ' -H "Authorization: Bearer $CDPAE_READ_API_KEY"' if settings.read_api_key else ""
    return (
        f"curl -s -X POST http://{host}:{settings.port}/search/image-to-text "
        f"-H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {
        name: value
        for name, value in {
            "bundle": args.bundle,
            "host": args.host,
            "port": args.port,
            "data_dir": args.data_dir,
            "store": args.store,
            "ray": args.ray,
            "shards": args.shards,
            "log_level": args.log_level,
        }.items()
        if value is not None
    }
    try:
        settings = Settings(**overrides)
    except Exception as exc:  # pydantic ValidationError: say which setting is wrong
        print(f"cdpae serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)
    try:
        bundle = load_bundle(settings.bundle)
    except BundleError as exc:
        print(f"cdpae serve: {exc}", file=sys.stderr)
        return 2

    def announce(engine: Engine) -> None:
        if args.print_example:
            print(f"\nready. try:\n{example_curl(engine, settings)}\n", flush=True)

    app = create_app(settings, bundle=bundle, on_ready=announce)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # the service logs each request with its request id
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1
