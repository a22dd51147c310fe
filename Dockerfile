# syntax=docker/dockerfile:1
#
# The hpfeeds3 broker image:
#   docker build -t localhost/hpfeeds3-broker .
#   docker run -p 0.0.0.0:10000:10000 localhost/hpfeeds3-broker
# (localhost/: a name no public registry serves, so a missing image is an
# error, never someone else's broker pulled in its place.)
#
# Two stages: the builder installs the package and its broker dependencies into
# a virtual environment at /app; the final stage copies only that venv onto the
# same slim base (so /app/bin/python's link to /usr/local/bin/python stays valid),
# adds the sqlite3 shell, and runs as an unprivileged user. No compiler, no pip
# cache, no source tree in the final image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Only for a dependency without a wheel for this platform; stays in this stage.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /app
WORKDIR /src
COPY pyproject.toml README.md SECURITY.md ./
COPY docs ./docs
COPY src ./src
# pip builds a wheel from the source tree and installs it (not editable) with the broker extra.
RUN /app/bin/pip install ".[broker]" \
 && /app/bin/hpfeeds-broker --help > /dev/null


FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="hpfeeds3 broker" \
      org.opencontainers.image.description="hpfeeds broker: authenticated pub/sub for honeypot feeds" \
      org.opencontainers.image.licenses="MIT"
# The sqlite3 shell, for: docker-compose run --rm hpfeeds sqlite3 sqlite.db
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends sqlite3 \
 && rm -rf /var/lib/apt/lists/*
# A fixed uid/gid, so files mounted into /app/var (TLS key, an existing sqlite.db)
# can be given to it on the host: chown 10000:10000 FILE.
RUN groupadd --system --gid 10000 hpfeeds \
 && useradd --system --uid 10000 --gid hpfeeds --home-dir /app/var --no-create-home \
            --shell /usr/sbin/nologin hpfeeds
COPY --from=builder /app /app
# Created (and owned) before VOLUME, so a fresh named volume starts writable by hpfeeds.
RUN mkdir -p /app/var && chown hpfeeds:hpfeeds /app/var
ENV PATH=/app/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The broker's working directory: sqlite.db (the default auth store) and TLS files live here.
WORKDIR /app/var
VOLUME ["/app/var"]
USER 10000:10000
# 10000: hpfeeds (publishers and subscribers); 9431: Prometheus /metrics and /healthz.
EXPOSE 10000 9431
# Needs the exporter on 9431 (the default command below has it). A command without
# --exporter should disable this check (see deploy/compose/env-auth.yml).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["/app/bin/python", "-c", "import sys, urllib.request\ntry:\n    urllib.request.urlopen('http://127.0.0.1:9431/healthz', timeout=4)\nexcept Exception as exc:\n    sys.exit(f'unhealthy: {exc}')"]
CMD ["/app/bin/hpfeeds-broker", "--bind=0.0.0.0:10000", "--exporter=0.0.0.0:9431"]
