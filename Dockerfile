# syntax=docker/dockerfile:1
# Three stages:
#   wheels  compiles the service's dependencies (hnswlib ships no wheels) with a compiler;
#   api     the service image: those wheels only, no compiler, no torch, a non-root user;
#   train   torch (CPU) + the training extra; writes a bundle into /models (a volume).
# docker-compose.yml builds `train` and `api` from this file. scripts/dockerfile_as_script.py
# runs the RUN lines below as a plain shell script (tests/test_docker_files.py does so).
ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------- wheels
FROM ${PYTHON_IMAGE} AS wheels
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY training ./training
# The project's wheel plus a wheel of every service dependency, so `api` installs offline.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# ---------------------------------------------------------------------------- api
FROM ${PYTHON_IMAGE} AS api
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
RUN pip install --no-cache-dir --no-index --find-links /wheels /wheels/cdpae-*.whl \
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

# ---------------------------------------------------------------------------- train
FROM ${PYTHON_IMAGE} AS train
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --user-group --create-home cdpae \
    && mkdir -p /models \
    && chown cdpae:cdpae /models
# The one place an image reaches beyond PyPI: the CPU-only torch build (PyPI's is CUDA, GBs).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY --from=wheels /wheels /wheels
RUN pip install --no-cache-dir --find-links /wheels "$(echo /wheels/cdpae-*.whl)[train]" \
    && rm -rf /wheels
USER cdpae
# An empty named volume mounted here inherits this directory's owner (cdpae).
VOLUME ["/models"]
# Train only when the bundle is missing, so `docker compose up` a second time is instant.
CMD ["sh", "-c", "test -f /models/wikipedia/manifest.json && echo \"bundle /models/wikipedia exists\" || exec cdpae train --data wikipedia --out /models/wikipedia"]
