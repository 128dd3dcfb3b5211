# A model as an image, so rolling out a model is changing a tag. The embedder pod's init container
# copies /model into the volume the embedder reads (/models/current).
# Build with the model folder as context: docker build -f deploy/docker/model.Dockerfile -t lookalike-model:effnet-lite0-3183e23b40e1 var/demo/models/NAME
FROM busybox:1.37.0
COPY model.onnx manifest.json /model/
USER 10001:10001
ENTRYPOINT ["sh", "-c", "cp /model/* /models/current/"]
