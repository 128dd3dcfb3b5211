# Searcher: hnswlib shards over SQLite. hnswlib compiles from source; HNSWLIB_NO_NATIVE=1 keeps it off
# -march=native so the image runs on any x86-64 node, not only on CPUs like the build machine's.
# Build from the repository root: docker build -f deploy/docker/searcher.Dockerfile -t lookalike-searcher:0.1.0 .
# The base image, once for both stages: the floating 3.11 tag gets Python patch releases and Debian
# security fixes on every rebuild. For a reproducible build pin a digest (deploy/README.md):
#   --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HNSWLIB_NO_NATIVE=1
RUN apt-get update && apt-get install -y --no-install-recommends g++=4:12.2.0-3 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
COPY pyproject.toml README.md requirements.lock /src/
COPY protos /src/protos
COPY serving /src/serving
COPY quality /src/quality
COPY clients /src/clients
COPY embedder /src/embedder
COPY searcher /src/searcher
COPY exporter /src/exporter
COPY tools /src/tools
COPY web /src/web
# hnswlib with a smaller lock table, as `make` installs it (third_party/hnswlib/build_wheel.py says why).
COPY third_party/hnswlib /src/third_party/hnswlib
RUN wheel=$(/opt/venv/bin/python /src/third_party/hnswlib/build_wheel.py /tmp/wheels) \
    && /opt/venv/bin/pip install --constraint /src/requirements.lock "$wheel" "/src[searcher]"

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 lookalike && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin lookalike \
    && mkdir /data && chown 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 LOOKALIKE_SEARCHER_DATA=/data
USER 10001:10001
VOLUME /data
# 50052: gRPC (Searcher, grpc.health.v1, reflection); 9100: Prometheus /metrics.
EXPOSE 50052 9100
ENTRYPOINT ["python", "-m", "lookalike.searcher"]
