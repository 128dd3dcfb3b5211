# Embedder, CPU: ONNX Runtime on the CPU execution provider.
# Build from the repository root: docker build -f deploy/docker/embedder.Dockerfile -t lookalike-embedder:0.1.0 .
# The base image, once for both stages: the floating 3.11 tag gets Python patch releases and Debian
# security fixes on every rebuild. For a reproducible build pin a digest (deploy/README.md):
#   --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
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
RUN /opt/venv/bin/pip install --constraint /src/requirements.lock "/src[embedder]"

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 lookalike && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin lookalike
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 LOOKALIKE_EMBEDDER_MODEL=/models/current
USER 10001:10001
# 50051: gRPC (Embedder, grpc.health.v1, reflection); 9100: Prometheus /metrics.
EXPOSE 50051 9100
ENTRYPOINT ["python", "-m", "lookalike.embedder"]
