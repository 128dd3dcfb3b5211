"""The embedder service: encoded images in, unit-length embeddings and category probabilities out."""
