"""Run the Dockerfile's build steps as a plain shell script, without a Docker engine.

    python scripts/dockerfile_as_script.py --target api --workdir /tmp/df          # print it
    python scripts/dockerfile_as_script.py --target api --workdir /tmp/df --run    # run it
    python scripts/dockerfile_as_script.py --target api --workdir /tmp/df --run \\
        --serve-bundle models/wikipedia --port 8123   # then start CMD, poll HEALTHCHECK

Each stage gets a fresh virtualenv (standing in for the image's Python) and a
directory standing in for its file system. Adaptations, all printed as comments
in the script:
- absolute container paths (/src, /wheels, /models, /data) live under the stage's directory;
- apt-get steps are replaced by a check that the tools they install are present;
- useradd / chown are skipped (no users are created on the host);
- ARG lines become `export NAME="${NAME-default}"`: set NAME in the environment to override
  (e.g. TORCH_SOURCE=local with the wheel in docker/local-wheels/, offline);
- a COPY into /usr/local/ (a Python prefix in the image) copies into the stage's venv;
- `--no-cache-dir` is dropped so the host's pip cache is reused (hnswlib compiles once).
USER, EXPOSE and VOLUME have no shell equivalent and are listed only.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAPPED_DIRS = ("/src", "/wheels", "/models", "/data", "/local-wheels", "/torch")
# Absolute paths that mean the same thing on the host, or only matter to apt.
HOST_PATHS = ("/dev/null", "/var/lib/apt/lists")
SKIPPED_COMMANDS = ("useradd", "chown")
APT_TOOLS = {"build-essential": ("gcc", "g++", "make")}


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)


def logical_lines(text: str) -> list[str]:
    """Join backslash continuations; drop comments and blank lines."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append((current + stripped).strip())
        current = ""
    if current:
        lines.append(current.strip())
    return lines


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, flags=re.IGNORECASE)
            if not match:
                raise ValueError(f"FROM without a stage name: {line!r}")
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), match.group(1))
            stages.append(Stage(name=match.group(2), base=base))
        else:
            if not stages:
                raise ValueError(f"{keyword} before the first FROM")
            stages[-1].instructions.append(Instruction(keyword, rest))
    return args, stages


def copy_from(instruction: Instruction) -> str | None:
    match = re.match(r"--from=(\S+)\s", instruction.args)
    return match.group(1) if match else None


def stages_for(target: str, stages: list[Stage]) -> list[Stage]:
    """The target and every stage it copies from, in Dockerfile order."""
    by_name = {s.name: s for s in stages}
    if target not in by_name:
        raise SystemExit(f"no stage {target!r} in the Dockerfile (have: {', '.join(by_name)})")
    needed: set[str] = set()

    def visit(name: str) -> None:
        if name in needed:
            return
        needed.add(name)
        for ins in by_name[name].instructions:
            if ins.keyword == "COPY" and (source := copy_from(ins)):
                visit(source)

    visit(target)
    return [s for s in stages if s.name in needed]


def map_paths(text: str, stage_root: str) -> str:
    """/wheels -> $ROOT/<stage>/wheels for the container directories the Dockerfile uses."""
    for directory in MAPPED_DIRS:
        text = re.sub(
            rf"(?<![\w./$]){re.escape(directory)}(?=[/\s\"':*]|$)", stage_root + directory, text
        )
    return text


def adapt_command(command: str) -> str:
    """One `&&`-separated piece of a RUN line, adapted to a host shell."""
    words = command.split()
    if not words:
        return ":"
    if words[0] == "apt-get" or command.startswith("rm -rf /var/lib/apt"):
        checks = [
            f"command -v {tool} >/dev/null"
            for package, tools in APT_TOOLS.items()
            if package in words
            for tool in tools
        ]
        return " && ".join(checks) if checks else ": apt step skipped"
    if words[0] in SKIPPED_COMMANDS:
        return f": skipped {words[0]}"
    return command.replace("--no-cache-dir", "")


def split_and(command: str) -> list[str]:
    return [piece.strip() for piece in command.split(" && ")]


def stage_script(stage: Stage, root: Path) -> str:
    stage_root = str(root / stage.name)
    venv = root / f"{stage.name}.venv"
    out = [
        f"# ---- stage {stage.name} (image {stage.base}) -> {stage_root}, venv {venv}",
        f"rm -rf {shlex.quote(stage_root)} {shlex.quote(str(venv))}",
        f"mkdir -p {shlex.quote(stage_root)}",
        f"{shlex.quote(sys.executable)} -m venv {shlex.quote(str(venv))}",
        f"export PATH={shlex.quote(str(venv / 'bin'))}:$BASE_PATH",
        f"cd {shlex.quote(stage_root)}",
    ]
    for ins in stage.instructions:
        if ins.keyword == "RUN":
            pieces = [map_paths(adapt_command(p), stage_root) for p in split_and(ins.args)]
            out.append(f"# RUN {ins.args}")
            out.append(" && ".join(pieces))
        elif ins.keyword == "ENV":
            for assignment in shlex.split(ins.args):
                out.append(f"export {shlex.quote(map_paths(assignment, stage_root))}")
        elif ins.keyword == "WORKDIR":
            path = map_paths(ins.args, stage_root)
            out.append(f"mkdir -p {path} && cd {path}")
        elif ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            out.append(f'export {name}="${{{name}-{default.strip(chr(34))}}}"')
        elif ins.keyword == "COPY":
            source_stage = copy_from(ins)
            parts = shlex.split(re.sub(r"--from=\S+\s+", "", ins.args))
            sources, dest = parts[:-1], parts[-1]
            if source_stage:
                src_root = str(root / source_stage)
                paths = [map_paths(s, src_root) for s in sources]
            else:
                paths = [str(REPO / s) + ("/" if s.endswith("/") else "") for s in sources]
            # Docker copies the contents of a `dir/` source; cp -a does so for `dir/.`
            srcs = " ".join(shlex.quote(s + "." if s.endswith("/") else s) for s in paths)
            dest = (
                str(venv) + "/" if dest.rstrip("/") == "/usr/local" else map_paths(dest, stage_root)
            )
            out.append(f"mkdir -p {dest if dest.endswith('/') else os.path.dirname(dest) or '.'}")
            out.append(f"cp -a {srcs} {dest}")
        else:
            out.append(f"# {ins.keyword} {ins.args}  (no shell equivalent; not run)")
    return "\n".join(out)


def shell_command(instruction_args: str) -> list[str]:
    """CMD/HEALTHCHECK CMD in exec (JSON) or shell form -> argv."""
    import json

    args = instruction_args.strip()
    if args.startswith("["):
        return json.loads(args)
    return ["sh", "-c", args]


def build_script(target: str, root: Path, dockerfile: Path) -> str:
    _, stages = parse_dockerfile(dockerfile)
    body = [
        "#!/usr/bin/env bash",
        f"# Generated from {dockerfile} (target {target}) by scripts/dockerfile_as_script.py",
        "set -euo pipefail",
        'BASE_PATH="$PATH"',
        "export PIP_DISABLE_PIP_VERSION_CHECK=1",
    ]
    for stage in stages_for(target, stages):
        body.append(f"(\n{stage_script(stage, root)}\n)")
    body.append(f'echo "dockerfile_as_script: target {target} built under {root}"')
    return "\n".join(body) + "\n"


def final_env(stage: Stage, root: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage.instructions:
        if ins.keyword == "ENV":
            for assignment in shlex.split(ins.args):
                key, _, value = assignment.partition("=")
                env[key] = map_paths(value, str(root / stage.name))
    return env


def serve_and_probe(target: str, root: Path, dockerfile: Path, bundle: Path, port: int) -> int:
    """Start the stage's CMD with its ENV, then run its HEALTHCHECK until it passes."""
    import shutil
    import time

    _, stages = parse_dockerfile(dockerfile)
    stage = next(s for s in stages if s.name == target)
    env = {**os.environ, **final_env(stage, root), "CDPAE_PORT": str(port)}
    env["PATH"] = f"{root / (target + '.venv') / 'bin'}:{env['PATH']}"
    bundle_dest = Path(env["CDPAE_BUNDLE"])
    if bundle_dest.exists():
        shutil.rmtree(bundle_dest)
    shutil.copytree(bundle, bundle_dest)
    cmd = next(i for i in stage.instructions if i.keyword == "CMD")
    check = next(i for i in stage.instructions if i.keyword == "HEALTHCHECK")
    probe = shell_command(check.args.split(" CMD ", 1)[1])
    print(f"$ {' '.join(shell_command(cmd.args))}  (CDPAE_PORT={port})", flush=True)
    server = subprocess.Popen(shell_command(cmd.args), env=env, cwd=root / target)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if server.poll() is not None:
                print(f"CMD exited with {server.returncode}", file=sys.stderr)
                return 1
            if subprocess.run(probe, env=env, capture_output=True).returncode == 0:
                print(f"HEALTHCHECK passed: {' '.join(probe)[:80]}...", flush=True)
                return 0
            time.sleep(0.5)
        print("HEALTHCHECK never passed within 90 s", file=sys.stderr)
        return 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dockerfile", type=Path, default=REPO / "Dockerfile")
    parser.add_argument("--target", default="api", help="stage to build (default api)")
    parser.add_argument("--workdir", type=Path, required=True, help="stands in for the images")
    parser.add_argument("--run", action="store_true", help="run the script (else print it)")
    parser.add_argument("--serve-bundle", type=Path, help="after --run: start CMD on this bundle")
    parser.add_argument("--port", type=int, default=8000, help="port for --serve-bundle")
    args = parser.parse_args(argv)
    root = args.workdir.resolve()
    script = build_script(args.target, root, args.dockerfile)
    if not args.run:
        print(script, end="")
        return 0
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{args.target}.sh").write_text(script)
    result = subprocess.run(["bash", str(root / f"{args.target}.sh")])
    if result.returncode != 0 or not args.serve_bundle:
        return result.returncode
    return serve_and_probe(args.target, root, args.dockerfile, args.serve_bundle, args.port)


if __name__ == "__main__":
    raise SystemExit(main())
