# Embedder, GPU: onnxruntime-gpu's CUDA execution provider on a CUDA + cuDNN runtime. The image ships no
# TensorRT libraries, so it asks for CUDA then CPU only (LOOKALIKE_EMBEDDER_PROVIDERS below, the one place
# that says which providers this image serves with).
# Build from the repository root: docker build -f deploy/docker/embedder-gpu.Dockerfile -t lookalike-embedder-gpu:0.1.0 .
# The base image, once for both stages. NVIDIA publishes full CUDA versions only (no floating minor tag),
# and onnxruntime-gpu is built for one CUDA major: the two move together, deliberately. PyPI's
# onnxruntime-gpu 1.31.1 links CUDA 13 and cuDNN 9 (readelf -d libonnxruntime_providers_cuda.so:
# libcudart.so.13, libcublas.so.13); on a CUDA 12 base its CUDA provider would not load and the embedder
# would stay NOT_SERVING. Digest: deploy/README.md.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG ONNXRUNTIME_GPU=1.31.1
FROM ${CUDA_IMAGE} AS build
ARG ONNXRUNTIME_GPU
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3.12=3.12.3-1ubuntu0.8 python3.12-venv=3.12.3-1ubuntu0.8 \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv
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
# The embedder-gpu extra names onnxruntime-gpu instead of onnxruntime: they share one module.
RUN /opt/venv/bin/pip install --constraint /src/requirements.lock "/src[embedder-gpu]" "onnxruntime-gpu==${ONNXRUNTIME_GPU}"

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3.12=3.12.3-1ubuntu0.8 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 lookalike && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin lookalike
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 LOOKALIKE_EMBEDDER_MODEL=/models/current \
    LOOKALIKE_EMBEDDER_PROVIDERS=cuda,cpu
USER 10001:10001
EXPOSE 50051 9100
ENTRYPOINT ["python", "-m", "lookalike.embedder"]
