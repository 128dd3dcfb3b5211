"""The searcher service: durable, category-sharded HNSW indexes routed on classifier confidence."""
