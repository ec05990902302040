"""The `cdpae` command: one entry point, one module per subcommand.

Each subcommand module has `main(argv: list[str] | None) -> int` and is
imported only when used, so `cdpae serve` never imports torch.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "train": (
        "training.train_cli",
        "train CDPAE on a data set, select on validation, export a bundle",
    ),
    "evaluate": (
        "training.evaluate_cli",
        "evaluate a bundle against the baselines on the test split",
    ),
    "serve": ("app.serve_cli", "serve a bundle over HTTP (FastAPI + uvicorn)"),
    "search": ("app.search_cli", "query a running service and print a table of hits"),
}


def _usage() -> str:
    lines = ["usage: cdpae <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "`cdpae <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"cdpae: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name in {"torch", "onnx", "matplotlib", "sklearn", "tqdm"}:
            print(
                f"cdpae {name}: needs the training extra ({exc.name} is not installed): "
                "pip install 'cdpae[train]'",
                file=sys.stderr,
            )
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
