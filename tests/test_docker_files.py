"""Dockerfile and docker-compose.yml, checked without a Docker engine.

The parse tests check that every stage, path, command, port, volume and setting
named in the two files refers to something real in the repo. The slow test runs
the Dockerfile's build steps for the `api` image as a plain shell script in fresh
virtualenvs (scripts/dockerfile_as_script.py), starts its CMD on a real bundle
and runs its HEALTHCHECK command until it passes.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from app.cli import SUBCOMMANDS
from app.settings import Settings
from scripts.dockerfile_as_script import parse_dockerfile, shell_command
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "training" / "datasets"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def stages() -> dict:
    _, parsed = parse_dockerfile(REPO / "Dockerfile")
    return {s.name: s for s in parsed}


def instructions(stage, keyword: str) -> list[str]:
    return [i.args for i in stage.instructions if i.keyword == keyword]


def env_of(stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions(stage, "ENV"):
        env.update(a.split("=", 1) for a in shlex.split(args))
    return env


def dockerignored(path: str) -> bool:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)


def assert_cdpae_command(argv: list[str]) -> None:
    """`cdpae <sub> ...`: a real subcommand; `--data X` a data set the repo ships."""
    assert argv[0] == "cdpae" and argv[1] in SUBCOMMANDS, argv
    if "--data" in argv:
        assert (DATASETS / f"{argv[argv.index('--data') + 1]}.npz").is_file()


def cdpae_commands(shell: str) -> list[list[str]]:
    """Every `cdpae ...` invocation inside a shell one-liner."""
    out = []
    for piece in re.split(r"&&|\|\||;", shell):
        words = shlex.split(piece)
        if "exec" in words[:1]:
            words = words[1:]
        if words and words[0] == "cdpae":
            out.append(words)
    return out


def test_dockerfile_has_its_stages_and_copies_only_real_unignored_paths(stages):
    assert {"wheels", "api", "torch", "train"} <= set(stages)
    for stage in stages.values():
        for args in instructions(stage, "COPY"):
            if args.startswith("--from="):
                assert args.split()[0].removeprefix("--from=") in stages
                continue
            for source in shlex.split(args)[:-1]:
                assert (REPO / source).exists(), source
                assert not dockerignored(source), f"{source} is excluded by .dockerignore"


def test_api_image_has_no_compiler_no_torch_runs_unprivileged_and_probes_readyz(stages):
    api = stages["api"]
    runs = " ".join(instructions(api, "RUN"))
    assert "apt-get" not in runs and "build-essential" not in runs
    assert "torch" not in runs.replace("find_spec('torch')", "")
    assert "--no-index" in runs and "[train]" not in runs
    assert instructions(api, "USER") and instructions(api, "USER")[-1] not in ("root", "0")
    (health,) = instructions(api, "HEALTHCHECK")
    assert "/readyz" in health and "CDPAE_PORT" in health
    assert_cdpae_command(shell_command(instructions(api, "CMD")[-1]))
    env = env_of(api)
    settings_fields = set(Settings.model_fields)
    for key in env:
        if key.startswith("CDPAE_"):
            assert key.removeprefix("CDPAE_").lower() in settings_fields, key
    assert env["CDPAE_PORT"] == instructions(api, "EXPOSE")[0]
    assert env["CDPAE_DATA_DIR"] == "/data" and env["CDPAE_BUNDLE"].startswith("/models/")


def test_train_image_pins_the_same_torch_as_pyproject_and_trains_a_shipped_data_set(stages):
    train = stages["train"]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["optional-dependencies"]["train"] if "torch" in d]
    assert pins == ["torch==2.13.0"]
    # torch is installed under a prefix in the `torch` stage, whose files train copies
    torch_run = " ".join(instructions(stages["torch"], "RUN"))
    assert '"torch==2.13.0"' in torch_run and '"torch==2.13.0+cpu"' in torch_run
    assert "--prefix /torch" in torch_run
    assert "--from=torch /torch/ /usr/local/" in instructions(train, "COPY")
    (cmd,) = instructions(train, "CMD")
    argv = shell_command(cmd)
    commands = cdpae_commands(argv[-1])
    assert commands and all(assert_cdpae_command(c) is None for c in commands)
    assert instructions(train, "USER")[-1] != "root"


def dockerfile_args(stage) -> dict[str, str]:
    return {
        name: value for name, _, value in (a.partition("=") for a in instructions(stage, "ARG"))
    }


def test_build_arguments_torch_source_and_extras(compose, stages):
    # TORCH_SOURCE: the compose file's default is the Dockerfile's, so both build the same
    (default,) = {dockerfile_args(stages["torch"])["TORCH_SOURCE"]}
    assert default == "https://download.pytorch.org/whl/cpu"
    args = compose["services"]["train"]["build"]["args"]
    assert args["TORCH_SOURCE"] == "${TORCH_SOURCE:-" + default + "}"
    assert "local)" in " ".join(instructions(stages["torch"], "RUN"))
    assert not dockerignored("docker/local-wheels/x.whl")
    # EXTRAS (e.g. cluster): wheels are built for it, api installs them, still offline
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "cluster" in pyproject["project"]["optional-dependencies"]
    for name in ("wheels", "api"):
        assert dockerfile_args(stages[name])["EXTRAS"] == '""'
        assert "${EXTRAS:+[$EXTRAS]}" in " ".join(instructions(stages[name], "RUN"))


def test_dockerfile_builds_air_gapped_and_portable(stages):
    text = (REPO / "Dockerfile").read_text()
    # a `# syntax=` line makes BuildKit fetch a frontend image from a registry
    assert not re.search(r"^#\s*syntax=", text, flags=re.MULTILINE)
    # hnswlib's -march=native would tie the api image to the build host's CPU
    assert env_of(stages["wheels"])["HNSWLIB_NO_NATIVE"] == "1"


def test_compose_check_finds_the_base_images_the_dockerfile_names():
    from scripts.compose_check import base_images, qualified

    assert base_images(REPO / "Dockerfile") == ["python:3.11-slim"]
    assert qualified("python:3.11-slim") == "docker.io/library/python:3.11-slim"


def test_compose_check_has_a_postgres_stand_in_for_the_cluster_profile(compose):
    from scripts.compose_check import (
        POSTGRES_CONTAINERFILE,
        POSTGRES_ENTRYPOINT,
        compose_images,
        qualified,
    )

    # the one image of the cluster profile that is not built from the Dockerfile
    assert compose_images("cluster") == ["postgres:15"]
    assert qualified("postgres:15") == "docker.io/library/postgres:15"
    # the stand-in honours what the compose file uses of the official image
    postgres = compose["services"]["postgres"]
    for item in postgres["environment"]:
        assert f"${{{item.split('=', 1)[0]}" in POSTGRES_ENTRYPOINT, item
    (data,) = postgres["volumes"]
    assert f"PGDATA={data.split(':')[1]}" in POSTGRES_CONTAINERFILE
    assert "pg_isready" in postgres["healthcheck"]["test"][1]
    assert "/usr/lib/postgresql/15/bin" in POSTGRES_CONTAINERFILE  # pg_isready on PATH
    assert "USER postgres" in POSTGRES_CONTAINERFILE
    subprocess.run(["sh", "-n", "-c", POSTGRES_ENTRYPOINT], check=True)


def test_compose_services_volumes_ports_and_commands_refer_to_real_things(compose, stages):
    every = compose["services"]
    # `docker compose up` starts these two; the rest is the cluster profile's
    services = {n: s for n, s in every.items() if not s.get("profiles")}
    assert set(services) == {"train", "api"}
    declared_volumes = set(compose["volumes"])
    for name, service in every.items():
        if "build" in service:
            assert service["build"]["context"] == "."
            assert service["build"]["target"] in stages, name
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert source in declared_volumes, f"{name}: volume {source} is not declared"

    train, api = services["train"], services["api"]
    # train writes the bundle the api serves, into the volume the api mounts read-only
    (train_cmd,) = cdpae_commands(train["command"][-1])
    assert_cdpae_command(train_cmd)
    out = train_cmd[train_cmd.index("--out") + 1]
    assert train["command"][-1] == shell_command(instructions(stages["train"], "CMD")[0])[-1]
    env = dict(item.split("=", 1) for item in api["environment"] if "=" in item)
    assert env["CDPAE_BUNDLE"] == out
    mounts = {m.split(":")[1]: m.split(":") for m in api["volumes"]}
    bundle_mount = next(t for t in mounts if out.startswith(t + "/"))
    assert mounts[bundle_mount][2] == "ro"
    assert [m.split(":")[0] for m in train["volumes"]] == [mounts[bundle_mount][0]]
    assert env["CDPAE_DATA_DIR"] in mounts and mounts[env["CDPAE_DATA_DIR"]][-1] != "ro"
    assert api["depends_on"]["train"]["condition"] == "service_completed_successfully"

    # every CDPAE_* variable is a real setting; the published port is the served one
    for item in api["environment"]:
        key = item.split("=", 1)[0]
        assert key.removeprefix("CDPAE_").lower() in Settings.model_fields, key
    (port,) = api["ports"]
    assert port.rsplit(":", 1)[1] == env["CDPAE_PORT"] == instructions(stages["api"], "EXPOSE")[0]
    kind, probe = api["healthcheck"]["test"]
    assert kind == "CMD-SHELL" and f"127.0.0.1:{env['CDPAE_PORT']}/readyz" in probe
    # docker-compose 1.29 (Debian 12's) rejects a top-level `name:`
    assert set(compose) == {"services", "volumes"}


def test_compose_cluster_profile_is_postgres_a_ray_head_two_workers_and_the_api(compose):
    cluster = {n: s for n, s in compose["services"].items() if "cluster" in s.get("profiles", [])}
    assert set(cluster) == {"postgres", "ray-head", "ray-worker-1", "ray-worker-2", "api-cluster"}
    # every Ray node (the front end is one too) runs the project's image with the cluster extra
    nodes = ["ray-head", "ray-worker-1", "ray-worker-2", "api-cluster"]
    assert {cluster[n]["image"] for n in nodes} == {"cdpae-api-cluster:latest"}
    assert all(cluster[n]["build"]["args"]["EXTRAS"] == "cluster" for n in nodes)
    head_port = re.search(r"--port=(\d+)", cluster["ray-head"]["command"]).group(1)
    for worker in ("ray-worker-1", "ray-worker-2"):
        assert f"--address=ray-head:{head_port}" in cluster[worker]["command"]
        assert cluster[worker]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    api = cluster["api-cluster"]
    env = dict(item.split("=", 1) for item in api["environment"] if "=" in item)
    for key in (item.split("=", 1)[0] for item in api["environment"]):
        if key.startswith("CDPAE_"):
            assert key.removeprefix("CDPAE_").lower() in Settings.model_fields, key
    assert env["CDPAE_RAY"] == f"ray-head:{head_port}"
    assert (
        env["CDPAE_STORE"].startswith("postgresql://") and "@postgres:5432/" in env["CDPAE_STORE"]
    )
    assert {"postgres", "ray-head", "train"} <= set(api["depends_on"])
    assert "exec cdpae serve" in api["command"]
    for name in ("postgres", "ray-head", "api-cluster"):
        assert cluster[name]["healthcheck"]["test"][0] == "CMD-SHELL", name


@pytest.mark.slow
def test_api_image_steps_run_as_a_shell_script_and_its_cmd_passes_its_healthcheck(
    tmp_path, synthetic_bundle
):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "dockerfile_as_script.py"),
            "--target",
            "api",
            "--workdir",
            str(tmp_path / "images"),
            "--run",
            "--serve-bundle",
            str(synthetic_bundle),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "HEALTHCHECK passed" in result.stdout
    # the service venv really has no torch (the Dockerfile's own check ran, this re-checks)
    venv_python = tmp_path / "images" / "api.venv" / "bin" / "python"
    probe = "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('app.main'))"
    out = subprocess.run([venv_python, "-c", probe], capture_output=True, text=True).stdout
    assert out.startswith("None ") and "app/main.py" in out


def compose_config_command() -> list[str] | None:
    """`docker compose` (v2 plugin) if present, else the old standalone `docker-compose`."""
    import shutil

    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_compose_tool_accepts_the_file(tmp_path):
    command = compose_config_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    files = ["-f", str(REPO / "docker-compose.yml")]
    result = subprocess.run(
        [*command, *files, "config"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin"},  # no CDPAE_* leaking in from the shell
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["services"]["api"]["depends_on"]["train"] == {
        "condition": "service_completed_successfully"
    }
    # v1 prints volumes as "src:dst:mode", v2 as mappings with read_only
    bundle_mount = resolved["services"]["api"]["volumes"][0]
    assert (
        bundle_mount.endswith(":ro") if isinstance(bundle_mount, str) else bundle_mount["read_only"]
    )
