"""`make compose-check`: build and run docker-compose.yml for real, the way a user does.

    python3 -m scripts.compose_check            # build (layer cache kept), up, check, tear down
    python3 -m scripts.compose_check --cold     # the first build without the layer cache
    python3 -m scripts.compose_check --purge    # afterwards also delete the images and storage
    python3 -m scripts.compose_check --profile cluster   # the cluster profile (below)

The engine is podman serving the Docker API on a socket of its own, with its own image storage
under var/compose-check/ (so a fresh clone builds cold and nothing else on the machine is
touched); Debian's docker-compose 1.29 talks to it through DOCKER_HOST. The Dockerfile and
docker-compose.yml are used as they are in the repo.

Air-gapped sites: the base images the Dockerfile names (python:3.11-slim) are pulled when a
registry answers; when none does, local stand-ins are built from Debian packages
(debootstrap bookworm + Debian's python3.11, the host's CA bundle as the site's trust) and
tagged with the same names, so `docker compose build` resolves them unchanged. torch comes
from a local wheel (docker/local-wheels/, TORCH_SOURCE=local) when the machine's pip
configuration has one, else from the PyTorch CPU index.

What it checks, in order, exiting 0 only when all passed and everything it started is gone:
train trains the bundle on a fresh state; api turns healthy by the compose healthcheck and by
the image's own HEALTHCHECK; api runs as non-root with no torch and no compiler; a search
through the published port returns the same hits as `make run` on the same bundle; an upsert
survives `compose restart api` and `compose down` / `up`, where train exits at once.

--profile cluster: `compose --profile cluster up -d` (postgres, ray-head, ray-worker-1/2 and
api-cluster next to train and api; postgres:15 gets a stand-in from Debian's postgresql-15
where no registry answers). The bundle an earlier run's train made (kept under var/) is put
into the fresh bundles volume, else train trains it. It checks: api-cluster turns healthy and
4 Ray nodes are alive; a search through api-cluster gives the hits of api and of `make run` on
the same bundle; an upsert through api-cluster is found by a filter search; after `podman kill`
of ray-worker-1 searches answer 200 again with the same hits (the time is printed); `compose
up -d` brings the worker back, with 4 Ray nodes and the same answers. Then `down -v`.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.support.ports import free_port  # standard library only, like this script

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / "var" / "compose-check"
PROJECT = "cdpae-check"  # the compose project: its containers, network and volumes
DEBIAN_SUITE = "bookworm"  # Debian 12: its python3.11 is the 3.11 python:3.11-slim names
STANDIN_BASE = f"localhost/cdpae-standin/debian-minbase:{DEBIAN_SUITE}"
TOOLS = {"podman": "podman", "docker-compose": "docker-compose", "debootstrap": "debootstrap"}
# podman on this kind of host: crun fails ("cgroups in hybrid mode not supported") and setting
# RLIMIT_NOFILE fails, so runc and no default ulimits. A private file, not /etc's.
CONTAINERS_CONF = """\
[containers]
default_ulimits = []

[engine]
runtime = "runc"
"""
STANDIN_CONTAINERFILE = """\
FROM {base}
ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
COPY ca-certificates.crt /tmp/site-ca.crt
# A venv at /usr/local gives what python:3.11-slim has there: python, pip (not Debian's
# externally managed one) and site-packages under /usr/local/lib/python3.11. The headers
# (libpython3.11-dev) are there for the compiler stages, as in the real image. The site's CA
# bundle goes in after ca-certificates, whose install would overwrite it; Debian's pip reads it.
RUN apt-get update \\
    && apt-get install -y --no-install-recommends python3 python3-venv libpython3.11-dev \\
        ca-certificates netbase tzdata \\
    && cp /tmp/site-ca.crt /etc/ssl/certs/ca-certificates.crt && rm /tmp/site-ca.crt \\
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /usr/share/doc/* \\
        /usr/lib/python3.11/config-3.11-x86_64-linux-gnu/*.a \\
    && python3 -m venv /usr/local \\
    && ln -sf python3 /usr/local/bin/python \\
    && rm -f /usr/local/bin/activate* /usr/local/bin/Activate.ps1 \\
    && python --version && pip --version
ENV PYTHON_VERSION={version}
LABEL org.opencontainers.image.description="local stand-in for {name} (Debian {suite})"
CMD ["python3"]
"""


class CheckFailed(Exception):
    pass


def log(message: str) -> None:
    print(f"[compose-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(
    argv: list[str],
    env: dict[str, str] | None = None,
    check: bool = True,
    capture: bool = True,
    timeout: float | None = None,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv, env=env, cwd=cwd, text=True, capture_output=capture, timeout=timeout
    )
    if check and result.returncode != 0:
        detail = (result.stdout or "")[-3000:] + (result.stderr or "")[-3000:] if capture else ""
        raise CheckFailed(f"{' '.join(argv)} exited {result.returncode}\n{detail}")
    return result


def http(
    method: str, url: str, body: object | None = None, timeout: float = 30
) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def wait_until(what: str, probe: object, timeout: float, interval: float = 1.0) -> float:
    """Call probe() until it returns true; the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(OSError, CheckFailed, ValueError):
            if probe():  # type: ignore[operator]
                return time.monotonic() - start
        time.sleep(interval)
    raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}")


# ------------------------------------------------------------------------------ tools, engine


def ensure_tools() -> None:
    """podman, docker-compose, debootstrap (and runc) from Debian's packages when missing."""
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if not shutil.which("runc"):
        missing.append("runc")
    if not missing:
        return
    log(f"installing {' '.join(missing)} from Debian's packages (apt-get)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run([*sudo, "apt-get", "update"], env=env, capture=False)
    run(
        [*sudo, "apt-get", "install", "-y", "--no-install-recommends", *missing],
        env=env,
        capture=False,
    )


def engine_env() -> dict[str, str]:
    """The environment every podman command of this script runs with: private conf + storage."""
    storage = STATE / "storage.conf"
    env = {
        **os.environ,
        "CONTAINERS_CONF": str(STATE / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(storage),
    }
    return env


def write_engine_config() -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    (STATE / "containers.conf").write_text(CONTAINERS_CONF)
    (STATE / "storage.conf").write_text(
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{STATE / "storage"}"\n'
        f'runroot = "{STATE / "run"}"\n'
    )


def podman(*args: str, check: bool = True, timeout: float | None = None) -> str:
    return run(["podman", *args], env=engine_env(), check=check, timeout=timeout).stdout.strip()


@contextlib.contextmanager
def podman_service() -> Iterator[str]:
    """`podman system service` on a socket under STATE; stopped (and waited for) on exit."""
    sock = STATE / "podman.sock"
    sock.unlink(missing_ok=True)
    log_file = (STATE / "podman-service.log").open("w")
    process = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        env=engine_env(),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped as one, by its id
    )
    try:
        host = f"unix://{sock}"

        def pinged() -> bool:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(sock))
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
                return s.recv(4096).split(b"\r\n\r\n", 1)[-1].strip() == b"OK"

        wait_until("the podman API socket", pinged, 30, 0.3)
        log(
            f"podman {podman('--version').split()[-1]} serves the Docker API on {host} (pid "
            f"{process.pid})"
        )
        yield host
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log_file.close()
        sock.unlink(missing_ok=True)
        log(f"podman service (pid {process.pid}) stopped")


# ------------------------------------------------------------------------------ base images


def base_images(dockerfile: Path) -> list[str]:
    """Images the Dockerfile's FROM lines name (ARG defaults resolved), not its own stages."""
    args: dict[str, str] = {}
    stages: set[str] = set()
    images: list[str] = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "ARG" and "=" in words[1] and not stages:
            key, _, value = words[1].partition("=")
            args[key] = value.strip('"')
        elif words[0] == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), words[1])
            if image not in stages and image not in images:
                images.append(image)
            if len(words) >= 4 and words[2].upper() == "AS":
                stages.add(words[3])
    return images


def qualified(image: str) -> str:
    """Docker's reading of a short name: python:3.11-slim -> docker.io/library/python:3.11-slim."""
    first = image.split("/", 1)[0]
    if "/" not in image:
        return f"docker.io/library/{image}"
    if "." not in first and ":" not in first and first != "localhost":
        return f"docker.io/{image}"
    return image


def image_exists(name: str) -> bool:
    return run(["podman", "image", "exists", name], env=engine_env(), check=False).returncode == 0


def debian_mirror() -> str:
    """The host's Debian mirror (apt sources), so debootstrap uses what apt here uses."""
    for source in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        with contextlib.suppress(OSError):
            match = re.search(r"(?:URIs:\s*|deb\s+)(https?://\S+/debian)\b", source.read_text())
            if match:
                return match.group(1)
    return "http://deb.debian.org/debian"


def site_ca_bundle() -> Path:
    for candidate in (os.environ.get("PIP_CERT"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise CheckFailed("no CA bundle on this machine (PIP_CERT or /etc/ssl/certs)")


def build_standin_base() -> None:
    """debootstrap --variant=minbase into a directory, imported as STANDIN_BASE."""
    if image_exists(STANDIN_BASE):
        return
    root = STATE / f"debootstrap-{DEBIAN_SUITE}"
    start = time.monotonic()
    if root.exists():
        shutil.rmtree(root)
    mirror = debian_mirror()
    log(f"debootstrap --variant=minbase {DEBIAN_SUITE} from {mirror}")
    run(["debootstrap", "--variant=minbase", DEBIAN_SUITE, str(root), mirror])
    # debootstrap leaves the .debs it installed and the package lists (~80 MB): every image
    # built on the stand-in would carry them.
    for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (root / leftovers).glob("*"):
            if path.is_file():
                path.unlink()
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    run_import = subprocess.run(
        ["podman", "import", "-", STANDIN_BASE],
        stdin=tar.stdout,
        env=engine_env(),
        capture_output=True,
        text=True,
    )
    tar.wait()
    if run_import.returncode != 0 or tar.returncode != 0:
        raise CheckFailed(f"podman import failed: {run_import.stderr}")
    shutil.rmtree(root)
    log(f"{STANDIN_BASE} imported ({time.monotonic() - start:.0f} s)")


def build_python_standin(image: str) -> None:
    match = re.fullmatch(r"docker\.io/library/python:(3\.11)-slim(?:-bookworm)?", image)
    if not match:
        raise CheckFailed(f"no registry answers and there is no stand-in recipe for {image}")
    build_standin_base()
    context = STATE / "standin-context"
    context.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(site_ca_bundle(), context / "ca-certificates.crt")
    (context / "Containerfile").write_text(
        STANDIN_CONTAINERFILE.format(
            base=STANDIN_BASE, version=match.group(1), name=image, suite=DEBIAN_SUITE
        )
    )
    start = time.monotonic()
    run(["podman", "build", "--network", "host", "-t", image, str(context)], env=engine_env())
    log(f"stand-in {image} built ({time.monotonic() - start:.0f} s)")


# PostgreSQL's stand-in: Debian's postgresql-15 under the same name, with an entrypoint that
# does what the official image's does for what docker-compose.yml uses of it.
POSTGRES_CONTAINERFILE = r"""FROM {base}
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 PGDATA=/var/lib/postgresql/data
# create_main_cluster = false: the package's postinst would initdb a cluster of its own under
# /var/lib/postgresql/15/main; the entrypoint initdbs PGDATA on the first start instead.
RUN mkdir -p /etc/postgresql-common \
    && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf \
    && apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /usr/share/doc/* \
    && mkdir -p "$PGDATA" /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
    && chmod 700 "$PGDATA"
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
USER postgres
VOLUME ["/var/lib/postgresql/data"]
EXPOSE 5432
LABEL org.opencontainers.image.description="local stand-in for {name} (Debian {suite})"
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
"""
POSTGRES_ENTRYPOINT = r"""#!/bin/sh
# The official postgres image's interface as docker-compose.yml uses it: POSTGRES_USER,
# POSTGRES_PASSWORD and POSTGRES_DB make the superuser and the database on the first start (an
# empty PGDATA); the server then listens on 5432 on every interface with password (scram) auth
# over TCP, trust on the local socket (what pg_isready in the healthcheck uses).
set -eu
if [ "${1:-postgres}" != postgres ]; then exec "$@"; fi
shift || true
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}"
user="${POSTGRES_USER:-postgres}"
db="${POSTGRES_DB:-$user}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb -D "$PGDATA" --username="$user" --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$db" != postgres ]; then
        pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
        psql -v ON_ERROR_STOP=1 --username="$user" --dbname=postgres \
            -c "CREATE DATABASE \"$db\""
        pg_ctl -D "$PGDATA" -m fast -w stop
    fi
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
"""


def build_postgres_standin(image: str) -> None:
    if not re.fullmatch(r"docker\.io/library/postgres:15(?:-bookworm)?", image):
        raise CheckFailed(f"no registry answers and there is no stand-in recipe for {image}")
    build_standin_base()
    context = STATE / "standin-postgres"
    context.mkdir(parents=True, exist_ok=True)
    entrypoint = context / "docker-entrypoint.sh"
    entrypoint.write_text(POSTGRES_ENTRYPOINT)
    entrypoint.chmod(0o755)
    (context / "Containerfile").write_text(
        POSTGRES_CONTAINERFILE.format(base=STANDIN_BASE, name=image, suite=DEBIAN_SUITE)
    )
    start = time.monotonic()
    run(["podman", "build", "--network", "host", "-t", image, str(context)], env=engine_env())
    log(f"stand-in {image} built ({time.monotonic() - start:.0f} s)")


def compose_images(profile: str) -> list[str]:
    """Images services of `profile` run without building them (postgres:15 for cluster)."""
    import yaml

    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    return [
        s["image"]
        for s in services.values()
        if "build" not in s and profile in s.get("profiles", [])
    ]


def ensure_base_images(report: dict[str, str], extra: tuple[str, ...] = ()) -> None:
    for short in [*base_images(REPO / "Dockerfile"), *extra]:
        image = qualified(short)
        if image_exists(image):
            report[short] = "present"
            continue
        log(f"pulling {image}")
        pulled = run(["podman", "pull", image], env=engine_env(), check=False, timeout=120)
        if pulled.returncode == 0:
            report[short] = "pulled"
            continue
        log(f"no registry answers for {image}: building a local stand-in from Debian packages")
        start = time.monotonic()
        if "/postgres:" in image:
            build_postgres_standin(image)
        else:
            build_python_standin(image)
        report[short] = f"stand-in built in {time.monotonic() - start:.0f} s"


# ------------------------------------------------------------------------------ torch


def pip_find_links() -> list[Path]:
    """find-links directories of this machine's pip configuration (environment, then files)."""
    values = os.environ.get("PIP_FIND_LINKS", "").split()
    files = [
        "/etc/pip.conf",
        "/etc/xdg/pip/pip.conf",
        str(Path.home() / ".config/pip/pip.conf"),
        str(Path.home() / ".pip/pip.conf"),
    ]
    for name in [*files, os.environ.get("PIP_CONFIG_FILE", "")]:
        parser = configparser.ConfigParser()
        with contextlib.suppress(OSError, configparser.Error):
            parser.read(name)
            for section in parser.sections():
                values += parser[section].get("find-links", "").split()
    return [Path(v.removeprefix("file://")) for v in values if not v.startswith("http")]


def torch_pin() -> str:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (pin,) = [d for d in pyproject["project"]["optional-dependencies"]["train"] if "torch" in d]
    return pin.split("==")[1]


def stage_local_torch() -> str:
    """Copy the local CPU torch wheel into docker/local-wheels/: 'local', or the default index."""
    version = torch_pin()
    pattern = f"torch-{version}+cpu-cp311-cp311-*.whl"
    target = REPO / "docker" / "local-wheels"
    for directory in pip_find_links():
        for wheel in sorted(directory.glob(pattern)):
            dest = target / wheel.name
            if not dest.exists() or dest.stat().st_size != wheel.stat().st_size:
                shutil.copyfile(wheel, dest)
            log(f"torch from {wheel} (TORCH_SOURCE=local, via docker/local-wheels/)")
            return "local"
    log(f"no local {pattern}: torch from the PyTorch CPU index (the Dockerfile's default)")
    return ""


# ------------------------------------------------------------------------------ compose


class Compose:
    def __init__(
        self,
        docker_host: str,
        port: int,
        torch_source: str,
        profile: str | None = None,
        cluster_port: int | None = None,
    ) -> None:
        # Only what compose needs: no CDPAE_* from the caller's shell changes the deployment.
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "DOCKER_HOST": docker_host,
            "CDPAE_PUBLISH_PORT": str(port),
            "COMPOSE_HTTP_TIMEOUT": "600",
        }
        if cluster_port is not None:
            self.env["CDPAE_CLUSTER_PUBLISH_PORT"] = str(cluster_port)
        if torch_source:
            self.env["TORCH_SOURCE"] = torch_source
        self.base = ["docker-compose", "-p", PROJECT, "-f", str(REPO / "docker-compose.yml")]
        if profile:
            self.base += ["--profile", profile]

    def __call__(self, *args: str, check: bool = True, capture: bool = True) -> str:
        result = run([*self.base, *args], env=self.env, check=check, capture=capture)
        return (result.stdout or "") + (result.stderr or "")

    def container(self, service: str) -> str:
        out = self("ps", "-a", "-q", service).split()
        ids = [word for word in out if re.fullmatch(r"[0-9a-f]{12,64}", word)]
        if not ids:
            raise CheckFailed(f"no container for service {service}")
        return ids[0]


def inspect(container: str, template: str) -> str:
    return podman("inspect", "--format", template, container)


def wait_train_exit(compose: Compose, timeout: float) -> tuple[int, float]:
    start = time.monotonic()
    container = compose.container("train")

    def exited() -> bool:
        return inspect(container, "{{.State.Status}}") in ("exited", "stopped")

    wait_until("train to exit", exited, timeout, 2)
    code = int(inspect(container, "{{.State.ExitCode}}"))
    started = inspect(container, "{{.State.StartedAt}}")
    finished = inspect(container, "{{.State.FinishedAt}}")
    return code, duration(started, finished) or time.monotonic() - start


def duration(started: str, finished: str) -> float | None:
    """Seconds between two podman timestamps ('2026-12-03 05:41:02.123 +0000 UTC')."""
    from datetime import datetime

    def parse(stamp: str) -> datetime:
        day, clock = stamp.split()[:2]
        whole, _, frac = clock.partition(".")
        return datetime.fromisoformat(f"{day}T{whole}.{(frac or '0')[:6]:0<6}")

    with contextlib.suppress(ValueError, IndexError):
        return (parse(finished) - parse(started)).total_seconds()
    return None


def wait_healthy(compose: Compose, timeout: float, service: str = "api") -> tuple[float, str]:
    """The compose healthcheck until it reports healthy: (seconds since the container started,
    the check's command). podman schedules healthchecks with systemd timers; without systemd
    (this host) nothing runs them, so this runs each one as the timer would
    (`podman healthcheck run`), every 2 s."""
    from datetime import datetime

    container = compose.container(service)
    test = json.loads(inspect(container, "{{json .Config.Healthcheck.Test}}"))
    if test[0] != "CMD-SHELL" or "/readyz" not in test[1]:
        raise CheckFailed(f"{service}'s healthcheck is not the compose file's: {test}")

    def healthy() -> bool:
        run(["podman", "healthcheck", "run", container], env=engine_env(), check=False)
        return inspect(container, "{{.State.Health.Status}}") == "healthy"

    wait_until(f"{service} to turn healthy", healthy, timeout, 2)
    now = datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")  # podman's format, local time
    since = duration(inspect(container, "{{.State.StartedAt}}"), now) or 0.0
    return since, test[1]


def image_healthcheck_passes(container: str, image: str) -> str:
    """Run the image's own HEALTHCHECK command (not the compose one) inside the container."""
    test = json.loads(
        podman("image", "inspect", "--format", "{{json .Config.Healthcheck.Test}}", image)
    )
    if test[0] == "CMD-SHELL":
        argv = ["sh", "-c", test[1]]
    elif test[0] == "CMD":
        argv = test[1:]
    else:
        raise CheckFailed(f"{image} has no HEALTHCHECK ({test})")
    podman("exec", container, *argv)
    return " ".join(argv)


def image_size_mb(image: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image)) / 1e6


# ------------------------------------------------------------------------------ make run


@contextlib.contextmanager
def make_run(cdpae: Path, bundle: Path, port: int) -> Iterator[tuple[str, list[str]]]:
    """What `make run` runs once installed, on `bundle`: (its base URL, the example query it
    printed). The Makefile's compose-check target installs the venv first, as `make run` does."""
    data_dir = STATE / "make-run-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    out_path = STATE / "make-run.log"
    out = out_path.open("w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDPAE_")}
    env["CDPAE_DATA_DIR"] = str(data_dir)  # a fresh store, seeded like the container's
    argv = [str(cdpae), "serve", "--bundle", str(bundle), "--host", "127.0.0.1"]
    process = subprocess.Popen(
        [*argv, "--port", str(port), "--print-example"],
        cwd=REPO,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def printed_example() -> bool:
            if process.poll() is not None:
                raise CheckFailed(
                    f"cdpae serve exited {process.returncode}: {out_path.read_text()}"
                )
            return "curl -s -X POST" in out_path.read_text()

        wait_until("cdpae serve to print its example query", printed_example, 1200, 1)
        line = next(x for x in out_path.read_text().splitlines() if "curl -s -X POST" in x)
        import shlex

        yield f"http://127.0.0.1:{port}", shlex.split(line)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        out.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def curl_to_request(argv: list[str]) -> tuple[str, dict]:
    """The path and JSON body of the `curl ... URL ... -d BODY` line `cdpae serve` prints."""
    url = next(a for a in argv if a.startswith("http://"))
    body = json.loads(argv[argv.index("-d") + 1])
    return "/" + url.split("/", 3)[3], body


# ------------------------------------------------------------------------------ the check


def check(args: argparse.Namespace) -> list[str]:
    passed: list[str] = []
    numbers: dict[str, str] = {}

    def ok(what: str) -> None:
        passed.append(what)
        log(f"PASS {what}")

    ensure_tools()
    write_engine_config()
    with podman_service() as docker_host:
        bases: dict[str, str] = {}
        ensure_base_images(bases)
        for name, how in bases.items():
            numbers[f"base image {name}"] = how
        torch_source = stage_local_torch()
        port = free_port()
        compose = Compose(docker_host, port, torch_source)
        compose("down", "-v", "--remove-orphans")  # a fresh state: no bundle, no gallery

        try:
            build = ["build", "--no-cache"] if args.cold else ["build"]
            start = time.monotonic()
            log(f"docker-compose {' '.join(build)} ({'cold' if args.cold else 'layer cache kept'})")
            compose(*build, capture=False)
            numbers["build " + ("cold (--no-cache)" if args.cold else "first")] = (
                f"{time.monotonic() - start:.0f} s"
            )
            start = time.monotonic()
            compose("build", capture=False)
            numbers["build warm (layer cache)"] = f"{time.monotonic() - start:.1f} s"
            for service in ("api", "train"):
                numbers[f"image cdpae-{service}"] = (
                    f"{image_size_mb(f'cdpae-{service}:latest'):.0f} MB"
                )
            log(", ".join(f"{k}: {v}" for k, v in numbers.items()))

            start = time.monotonic()
            compose("up", "-d", capture=False)
            code, took = wait_train_exit(compose, 1800)
            train_log = compose("logs", "--no-color", "train")
            if code != 0 or "bundle:" not in train_log:
                raise CheckFailed(f"train exited {code}:\n{train_log[-3000:]}")
            summary = [x for x in train_log.splitlines() if "selected:" in x or "bundle:" in x]
            numbers["train (fresh volume)"] = f"{took:.0f} s"
            ok(f"train trained the bundle on a fresh volume ({took:.0f} s)")
            for line in summary:
                log("  " + line.split("|", 1)[-1].strip())

            healthy_after, test = wait_healthy(compose, 600)
            api = compose.container("api")
            ok(f"api healthy by the compose healthcheck {healthy_after:.0f} s after it started")
            log(f"  compose healthcheck: CMD-SHELL {test}")
            probe = image_healthcheck_passes(api, "cdpae-api:latest")
            ok("the image's own HEALTHCHECK passes in the api container")
            log(f"  image HEALTHCHECK: {probe}")

            uid = podman("exec", api, "sh", "-c", "awk '/^Uid:/ {print $2}' /proc/1/status")
            user = podman("exec", api, "id", "-un")
            if uid in ("", "0"):
                raise CheckFailed(f"api's process runs as uid {uid!r}")
            ok(f"api runs as {user} (uid {uid}), not root")
            torch = podman(
                "exec",
                api,
                "python",
                "-c",
                "import importlib.util as u; print(u.find_spec('torch'))",
            )
            compilers = podman(
                "exec",
                api,
                "sh",
                "-c",
                "for c in cc gcc g++ c++ clang; do command -v $c; done; true",
            )
            if torch != "None" or compilers:
                raise CheckFailed(f"api image has torch={torch!r} compilers={compilers!r}")
            ok("api image has no torch and no compiler (cc gcc g++ c++ clang)")

            base = f"http://127.0.0.1:{port}"
            mount = podman("volume", "inspect", "--format", "{{.Mountpoint}}", f"{PROJECT}_bundles")
            bundle = STATE / "bundle-cache" / "wikipedia"  # kept: --profile cluster reuses it
            shutil.rmtree(bundle, ignore_errors=True)
            shutil.copytree(Path(mount) / "wikipedia", bundle)
            with make_run(args.cdpae, bundle, free_port()) as (local, example):
                path, body = curl_to_request(example)
                local_status, local_hits = http("POST", local + path, body)
            status, hits = http("POST", base + path, body)
            if status != 200 or local_status != 200:
                raise CheckFailed(f"search: api {status} {hits}, make run {local_status}")
            ids = [h["id"] for h in hits["results"][0]["hits"]]  # type: ignore[index]
            local_ids = [h["id"] for h in local_hits["results"][0]["hits"]]  # type: ignore[index]
            scores = [h["score"] for h in hits["results"][0]["hits"]]  # type: ignore[index]
            local_scores = [h["score"] for h in local_hits["results"][0]["hits"]]  # type: ignore[index]
            if ids != local_ids or any(
                abs(a - b) > 1e-5 for a, b in zip(scores, local_scores, strict=True)
            ):
                raise CheckFailed(f"api hits {hits} != make run hits {local_hits}")
            answer = ", ".join(
                f"{h['id']} {h['score']:.4f} {h['metadata'].get('category', '')}"  # type: ignore[index]
                for h in hits["results"][0]["hits"]  # type: ignore[index]
            )
            numbers["search"] = f"POST {path} top_k={body['top_k']}: {answer}"
            ok(
                f"search on 127.0.0.1:{port}{path} = make run's cdpae serve on the same bundle: "
                + answer
            )

            item_id = f"compose-check-{int(time.time())}"
            item = {
                "id": item_id,
                "vector": body["vectors"][0],
                "metadata": {"by": "compose-check"},
            }
            status, answer_upsert = http("PUT", base + "/gallery/image/items", {"items": [item]})
            if status != 200:
                raise CheckFailed(f"upsert: {status} {answer_upsert}")

            def item_there() -> bool:
                status, got = http("GET", f"{base}/gallery/image/items/{item_id}")
                return status == 200 and got["metadata"] == item["metadata"]  # type: ignore[index]

            compose("restart", "api")
            wait_healthy(compose, 300)
            if not item_there():
                raise CheckFailed("the upserted item is gone after compose restart api")
            ok("an upsert survives compose restart api")

            compose("down")
            compose("up", "-d", capture=False)
            code, took = wait_train_exit(compose, 120)
            train_log = compose("logs", "--no-color", "train")
            if code != 0 or "bundle /models/wikipedia exists" not in train_log or took > 30:
                raise CheckFailed(
                    f"train on an existing bundle: exit {code}, {took:.0f} s\n{train_log[-2000:]}"
                )
            ok(f"train exits at once when the bundle exists ({took * 1000:.0f} ms)")
            wait_healthy(compose, 300)
            if not item_there():
                raise CheckFailed("the upserted item is gone after compose down / up")
            ok("the upsert survives compose down / up (named volume gallery)")
        finally:
            compose("down", "-v", "--remove-orphans", check=False)
            left = podman(
                "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"
            )
            volumes = podman(
                "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"
            )
            if left or volumes:
                raise CheckFailed(f"left behind: containers {left!r} volumes {volumes!r}")
            log("compose down -v: no container, network or volume of the check is left")
            if args.purge:
                podman("rmi", "--all", "--force", check=False)
    if args.purge:  # after the service stopped: nothing of the storage is in use any more
        shutil.rmtree(STATE, ignore_errors=True)
    for key, value in numbers.items():
        print(f"  {key}: {value}")
    return passed


# ------------------------------------------------------------------------------ the cluster check


@contextlib.contextmanager
def healthchecks_ticking(interval: float = 2.0) -> Iterator[None]:
    """Run the healthchecks of the project's running containers every `interval` s, as podman's
    systemd timers would (none here): `depends_on: condition: service_healthy` waits on them."""
    import threading

    stop = threading.Event()

    def tick() -> None:
        has_check: dict[str, bool] = {}
        while not stop.is_set():
            with contextlib.suppress(Exception):
                ids = podman(
                    "ps",
                    "-q",
                    "--filter",
                    f"label=com.docker.compose.project={PROJECT}",
                    check=False,
                ).split()
                for cid in ids:
                    if cid not in has_check:
                        test = inspect(cid, "{{json .Config.Healthcheck}}")
                        has_check[cid] = test not in ("", "null", "{}")
                    if has_check[cid]:
                        run(["podman", "healthcheck", "run", cid], env=engine_env(), check=False)
            stop.wait(interval)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)


def http_headers(
    method: str, url: str, body: object | None = None, timeout: float = 10
) -> tuple[int, object, dict[str, str]]:
    """http() that also returns the response headers (Retry-After on a 503)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null"), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace"), dict(exc.headers)


def seed_bundle_volume(cache: Path) -> bool:
    """Put a bundle `train` made before (kept under STATE by an earlier run) into the project's
    `bundles` volume, labelled as compose labels its own, so `train` exits at once."""
    if not (cache / "wikipedia" / "manifest.json").is_file():
        return False
    name = f"{PROJECT}_bundles"
    podman(
        "volume", "create",
        "--label", f"com.docker.compose.project={PROJECT}",
        "--label", "com.docker.compose.volume=bundles",
        "--label", "com.docker.compose.version=1.29.2",
        name,
    )  # fmt: skip
    mount = Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", name))
    shutil.copytree(cache / "wikipedia", mount / "wikipedia")
    for path in [mount, *mount.rglob("*")]:
        os.chown(path, 10001, 10001)  # train's user, as if train had written it
    return True


def hits_of(answer: object) -> list[dict]:
    return answer["results"][0]["hits"]  # type: ignore[index]


def same_ranking(a: object, b: object) -> bool:
    ha, hb = hits_of(a), hits_of(b)
    return [h["id"] for h in ha] == [h["id"] for h in hb] and all(
        abs(x["score"] - y["score"]) <= 1e-5 for x, y in zip(ha, hb, strict=True)
    )


def ray_alive_nodes(head: str) -> int:
    out = podman(
        "exec", head, "python", "-c",
        "import ray; ray.init(address='auto', logging_level='ERROR');"
        "print(sum(n['Alive'] for n in ray.nodes()))",
    )  # fmt: skip
    return int(out.split()[-1])


SHARD_PLACEMENT = """
import json, ray
from ray._private import state
ray.init(address="auto", logging_level="ERROR")
print(json.dumps([
    [a.get("Name", ""), a["Address"]["IPAddress"]]
    for a in state.actors().values() if a.get("State") in ("ALIVE", 2)
]))
"""


def shard_placement(compose: Compose, head: str) -> dict[str, list[str]]:
    """The live Ray actors (the shards) by the compose service whose container runs them."""
    actors = json.loads(podman("exec", head, "python", "-c", SHARD_PLACEMENT).splitlines()[-1])
    by_ip = {}
    for service in ("ray-head", "ray-worker-1", "ray-worker-2", "api-cluster"):
        cid = compose.container(service)
        if inspect(cid, "{{.State.Status}}") == "running":
            template = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
            by_ip[inspect(cid, template)] = service
    placement: dict[str, list[str]] = {}
    for name, ip in actors:
        placement.setdefault(by_ip.get(ip, ip), []).append(name)
    return placement


def placement_text(placement: dict[str, list[str]]) -> str:
    return ", ".join(f"{service}: {len(names)}" for service, names in sorted(placement.items()))


def check_cluster(args: argparse.Namespace) -> list[str]:
    """--profile cluster: postgres, a Ray head, two Ray workers and api-cluster next to api."""
    passed: list[str] = []
    numbers: dict[str, str] = {}

    def ok(what: str) -> None:
        passed.append(what)
        log(f"PASS {what}")

    ensure_tools()
    write_engine_config()
    with podman_service() as docker_host:
        bases: dict[str, str] = {}
        ensure_base_images(bases, tuple(compose_images("cluster")))
        for name, how in bases.items():
            numbers[f"base image {name}"] = how
        torch_source = stage_local_torch()
        port, cluster_port = free_port(), free_port()
        compose = Compose(docker_host, port, torch_source, "cluster", cluster_port)
        compose("down", "-v", "--remove-orphans")
        volumes_before = set(podman("volume", "ls", "-q").split())
        try:
            build = ["build", "--no-cache"] if args.cold else ["build"]
            start = time.monotonic()
            log(f"docker-compose --profile cluster {' '.join(build)}")
            compose(*build, capture=False)
            numbers["build all images " + ("cold (--no-cache)" if args.cold else "first")] = (
                f"{time.monotonic() - start:.0f} s"
            )
            start = time.monotonic()
            compose("build", capture=False)
            numbers["build warm (layer cache)"] = f"{time.monotonic() - start:.0f} s"
            for image in ("cdpae-api-cluster", "cdpae-api", "postgres"):
                tag = "postgres:15" if image == "postgres" else f"{image}:latest"
                numbers[f"image {tag}"] = f"{image_size_mb(tag):.0f} MB"
            log(", ".join(f"{k}: {v}" for k, v in numbers.items()))
            seeded = seed_bundle_volume(STATE / "bundle-cache")
            with healthchecks_ticking():
                start = time.monotonic()
                compose("up", "-d", capture=False)
                code, took = wait_train_exit(compose, 1800)
                train_log = compose("logs", "--no-color", "train")
                if code != 0:
                    raise CheckFailed(f"train exited {code}:\n{train_log[-3000:]}")
                how = "kept from an earlier run" if seeded else f"trained in {took:.0f} s"
                ok(f"train: the bundle ({how})")
                healthy_after, _ = wait_healthy(compose, 900, "api-cluster")
                up_to_healthy = time.monotonic() - start
                numbers["api-cluster healthy after `up -d`"] = f"{up_to_healthy:.0f} s"
                numbers["api-cluster healthy after its container started"] = (
                    f"{healthy_after:.0f} s"
                )
                wait_healthy(compose, 300, "api")
                ok(
                    f"postgres, ray-head, ray-worker-1/2, api-cluster up; api-cluster healthy "
                    f"{up_to_healthy:.0f} s after `up -d`"
                )
                head = compose.container("ray-head")
                nodes = ray_alive_nodes(head)
                if nodes != 4:
                    raise CheckFailed(f"{nodes} Ray nodes alive, expected 4 (head, 2, api)")
                ok("4 Ray nodes alive: ray-head, ray-worker-1, ray-worker-2, api-cluster")

                single, cluster = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{cluster_port}"
                bundle = STATE / "bundle-cache" / "wikipedia"
                if not seeded:  # kept for the next run (and make_run below)
                    shutil.rmtree(bundle, ignore_errors=True)
                    mount = podman(
                        "volume", "inspect", "--format", "{{.Mountpoint}}", f"{PROJECT}_bundles"
                    )
                    shutil.copytree(Path(mount) / "wikipedia", bundle)
                with make_run(args.cdpae, bundle, free_port()) as (local, example):
                    path, body = curl_to_request(example)
                    lstatus, local_hits = http("POST", local + path, body)
                if lstatus != 200:
                    raise CheckFailed(f"make run's cdpae serve: {lstatus} {local_hits}")
                status, want = http("POST", single + path, body)
                cstatus, got = http("POST", cluster + path, body)
                if status != 200 or cstatus != 200 or not same_ranking(got, want):
                    raise CheckFailed(f"api {status} {want} != api-cluster {cstatus} {got}")
                if not same_ranking(got, local_hits):
                    raise CheckFailed(f"api-cluster {got} != make run's {local_hits}")
                answer = ", ".join(
                    f"{h['id']} {h['score']:.4f} {h['metadata'].get('category', '')}"
                    for h in hits_of(got)
                )
                numbers["search"] = f"POST {path} top_k={body['top_k']}: {answer}"
                ok(
                    f"search on api-cluster (127.0.0.1:{cluster_port}{path}) = api's = make "
                    f"run's on the same bundle: {answer}"
                )

                # A text item with the vector of the first hit and metadata of its own, found
                # by a filter search through api-cluster (its write went through PostgreSQL).
                first = hits_of(got)[0]["id"]
                status, stored = http("GET", f"{cluster}/gallery/text/items/{first}")
                if status != 200:
                    raise CheckFailed(f"GET text item {first}: {status} {stored}")
                item_id = f"compose-check-{int(time.time())}"
                item = {
                    "id": item_id,
                    "vector": stored["vector"],  # type: ignore[index]
                    "metadata": {"by": "compose-check"},
                }
                status, put = http("PUT", cluster + "/gallery/text/items", {"items": [item]})
                if status != 200:
                    raise CheckFailed(f"upsert through api-cluster: {status} {put}")
                filtered = {**body, "filter": {"by": "compose-check"}}
                status, found = http("POST", cluster + path, filtered)
                if status != 200 or [h["id"] for h in hits_of(found)] != [item_id]:
                    raise CheckFailed(f"filter search for the upsert: {status} {found}")
                ok(f"an upsert through api-cluster is found by a filter search ({item_id})")
                _, before = http("POST", cluster + path, body)

                def recovered(name: str, since: float, statuses: list[str]) -> float:
                    def probe() -> bool:
                        status, answer, headers = http_headers("POST", cluster + path, body)
                        retry = headers.get("Retry-After") or headers.get("retry-after")
                        statuses.append(f"{status}" + (f" Retry-After {retry}" if retry else ""))
                        return status == 200 and same_ranking(answer, before)

                    wait_until(f"searches to answer 200 after {name}", probe, 300, 0.5)
                    return time.monotonic() - since

                def summary(statuses: list[str]) -> str:
                    counts: dict[str, int] = {}
                    for s in statuses:
                        counts[s] = counts.get(s, 0) + 1
                    return ", ".join(f"{n} x {s}" for s, n in counts.items())

                # Kill the worker that holds the most shards (a worker without one proves
                # nothing), then replace it: the killed container removed, `up -d` makes anew.
                placement = shard_placement(compose, head)
                numbers["shards (actors) per node"] = placement_text(placement)
                log(f"  shards per node: {placement_text(placement)}")
                victim = max(
                    ("ray-worker-1", "ray-worker-2"), key=lambda w: len(placement.get(w, []))
                )
                if not placement.get(victim):
                    raise CheckFailed(f"no shard on a Ray worker to kill: {placement}")
                worker = compose.container(victim)
                statuses: list[str] = []
                start = time.monotonic()
                podman("kill", worker)
                took = recovered(f"podman kill {victim}", start, statuses)
                state = inspect(worker, "{{.State.Status}} restarts={{.RestartCount}}")
                moved = placement_text(shard_placement(compose, head))
                numbers[f"recovery after podman kill {victim}"] = (
                    f"{took:.1f} s ({summary(statuses)}; the container then {state}; "
                    f"shards per node then {moved})"
                )
                ok(
                    f"searches answer 200 again {took:.1f} s after `podman kill` of {victim} "
                    f"with {len(placement[victim])} shard(s) ({summary(statuses)}), same hits"
                )

                compose("rm", "-f", "-v", victim)  # -v: its anonymous volume (/data) too
                compose("up", "-d", capture=False)
                replaced = compose.container(victim)
                running = inspect(replaced, "{{.State.Status}}")
                wait_until("4 Ray nodes alive again", lambda: ray_alive_nodes(head) == 4, 120, 2)
                statuses = []
                took = recovered("the worker's return", time.monotonic(), statuses)
                found_status, found = http("POST", cluster + path, filtered)
                if found_status != 200 or [h["id"] for h in hits_of(found)] != [item_id]:
                    raise CheckFailed(f"the upsert after the worker's return: {found}")
                if replaced == worker:
                    raise CheckFailed(f"{victim} was not replaced: the same container {worker}")
                numbers[f"{victim} replaced (`rm -f`, `up -d`)"] = (
                    f"a new container ({running}); 4 Ray nodes; searches 200 {took:.1f} s "
                    f"after ({summary(statuses)})"
                )
                ok(
                    f"{victim} replaced (`compose rm -f`, `compose up -d`: a new container), 4 "
                    "Ray nodes, searches and the filter search for the upsert answer as before"
                )
        finally:
            compose("down", "-v", "--remove-orphans", check=False)
            left = podman(
                "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"
            )
            volumes = podman(
                "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"
            )
            # anonymous volumes (an image's VOLUME no compose mount covers) carry no label
            volumes += " ".join(set(podman("volume", "ls", "-q").split()) - volumes_before)
            if left or volumes:
                raise CheckFailed(f"left behind: containers {left!r} volumes {volumes!r}")
            log("compose down -v: no container, network or volume of the check is left")
            if args.purge:
                podman("rmi", "--all", "--force", check=False)
    if args.purge:
        shutil.rmtree(STATE, ignore_errors=True)
    for key, value in numbers.items():
        print(f"  {key}: {value}")
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compose_check", description=__doc__.split("\n")[0])
    parser.add_argument("--cold", action="store_true", help="first build with --no-cache")
    parser.add_argument(
        "--purge",
        action="store_true",
        help="afterwards delete the images and podman storage under var/",
    )
    parser.add_argument(
        "--cdpae",
        type=Path,
        default=REPO / ".venv" / "bin" / "cdpae",
        help="the cdpae `make run` uses (default .venv/bin/cdpae, which `make install` makes)",
    )
    parser.add_argument(
        "--profile",
        choices=["cluster"],
        help="cluster: the cluster profile (postgres, Ray head and workers, api-cluster) too",
    )
    args = parser.parse_args(argv)
    if not args.cdpae.exists():
        print(f"compose-check: {args.cdpae} missing: run `make install` first", file=sys.stderr)
        return 2
    start = time.monotonic()
    try:
        passed = check_cluster(args) if args.profile == "cluster" else check(args)
    except CheckFailed as exc:
        print(f"compose-check FAILED: {exc}", file=sys.stderr)
        return 1
    print(
        f"compose-check OK in {time.monotonic() - start:.0f} s, {len(passed)} checks: "
        + "; ".join(passed)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
