# A model as an image, so rolling out a model is changing a tag. The embedder pod's init container
# copies /model into the volume the embedder reads (/models/current).
# Build with the model folder as context: docker build -f deploy/docker/model.Dockerfile -t lookalike-model:effnet-lite0-3183e23b40e1 var/demo/models/NAME
# The floating 1.37 tag takes BusyBox patch releases; pin a digest for a reproducible build (deploy/README.md).
ARG BUSYBOX_IMAGE=busybox:1.37
FROM ${BUSYBOX_IMAGE}
COPY model.onnx manifest.json /model/
USER 10001:10001
ENTRYPOINT ["sh", "-c", "cp /model/* /models/current/"]
