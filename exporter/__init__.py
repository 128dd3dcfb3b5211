"""The exporter: builds, fine-tunes and exports Torch models to ONNX with a verified manifest."""
