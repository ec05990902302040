# Four stages:
#   wheels  compiles the service's dependencies (hnswlib ships no wheels) with a compiler;
#   api     the service image: those wheels only, no compiler, no torch, a non-root user;
#   torch   torch (CPU) installed under a prefix, from TORCH_SOURCE;
#   train   that torch + the training extra; writes a bundle into /models (a volume).
# docker-compose.yml builds `train` and `api` from this file. scripts/dockerfile_as_script.py
# runs the RUN lines below as a plain shell script (tests/test_docker_files.py does so);
# scripts/compose_check.py (`make compose-check`) builds and runs it for real.
# No `# syntax=` line: BuildKit would fetch that frontend image from a registry, which an
# air-gapped site can't reach, and nothing here needs more than the built-in syntax.
# Build arguments:
#   PYTHON_IMAGE  the base image of every stage;
#   EXTRAS        extras of the project installed into `api` as well, e.g. EXTRAS=cluster
#                 (psycopg + ray) for an image that serves a PostgreSQL gallery;
#   TORCH_SOURCE  where `train` gets torch: a pip index URL (default: the PyTorch CPU index)
#                 or `local` for the wheels put into docker/local-wheels/ (offline builds).
ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------- wheels
FROM ${PYTHON_IMAGE} AS wheels
ARG EXTRAS=""
# hnswlib compiles with -march=native unless this is set: a wheel built on the build host's
# CPU could die with SIGILL on an older one, and the image runs wherever it is pulled.
ENV HNSWLIB_NO_NATIVE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY training ./training
# The project's wheel plus a wheel of every service dependency (and of EXTRAS'), so `api`
# installs offline.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".${EXTRAS:+[$EXTRAS]}"

# ---------------------------------------------------------------------------- api
FROM ${PYTHON_IMAGE} AS api
ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CDPAE_BUNDLE=/models/wikipedia \
    CDPAE_DATA_DIR=/data \
    CDPAE_HOST=0.0.0.0 \
    CDPAE_PORT=8000
RUN useradd --system --uid 10001 --user-group --no-create-home cdpae \
    && mkdir -p /models /data \
    && chown cdpae:cdpae /data
COPY --from=wheels /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels \
        "$(echo /wheels/cdpae-*.whl)${EXTRAS:+[$EXTRAS]}" \
    && rm -rf /wheels
# The service must not carry torch: fail the build if anything pulled it in.
RUN cdpae --help > /dev/null \
    && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"
USER cdpae
EXPOSE 8000
# /models holds bundles (mount read-only); /data holds the gallery store (SQLite).
VOLUME ["/data"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('CDPAE_PORT', '8000'), timeout=2)"
# Bundle, data dir, host and port come from the CDPAE_* variables above.
CMD ["cdpae", "serve"]

# ---------------------------------------------------------------------------- torch
# torch (CPU) installed under the prefix /torch, which `train` copies: a stage of its own so a
# local wheel (~190 MB) copied in for TORCH_SOURCE=local stays out of the train image's layers.
FROM ${PYTHON_IMAGE} AS torch
ARG TORCH_SOURCE=https://download.pytorch.org/whl/cpu
COPY docker/local-wheels/ /local-wheels/
# The one place an image reaches beyond PyPI: the CPU-only torch build (PyPI's is CUDA, GBs).
# TORCH_SOURCE=local takes it from docker/local-wheels/ instead (torch's own dependencies still
# come from PyPI); `+cpu` is pinned then so a missing wheel fails instead of pulling CUDA.
RUN case "$TORCH_SOURCE" in \
        local) torch_from="--find-links /local-wheels" pin="torch==2.13.0+cpu" ;; \
        *) torch_from="--index-url $TORCH_SOURCE" pin="torch==2.13.0" ;; \
    esac \
    && pip install --no-cache-dir --prefix /torch $torch_from "$pin"

# ---------------------------------------------------------------------------- train
FROM ${PYTHON_IMAGE} AS train
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --user-group --create-home cdpae \
    && mkdir -p /models \
    && chown cdpae:cdpae /models
# The prefix has the layout of the image's Python prefix (lib/python3.11/site-packages, bin).
COPY --from=torch /torch/ /usr/local/
COPY --from=wheels /wheels /wheels
RUN pip install --no-cache-dir --find-links /wheels "$(echo /wheels/cdpae-*.whl)[train]" \
    && rm -rf /wheels
USER cdpae
# An empty named volume mounted here inherits this directory's owner (cdpae).
VOLUME ["/models"]
# Train only when the bundle is missing, so `docker compose up` a second time is instant.
CMD ["sh", "-c", "test -f /models/wikipedia/manifest.json && echo \"bundle /models/wikipedia exists\" || exec cdpae train --data wikipedia --out /models/wikipedia"]
