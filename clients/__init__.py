"""Lookalike's Python client library and the `lookalike` command line."""
