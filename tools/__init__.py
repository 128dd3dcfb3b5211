"""Developer tools that start servers: the `lookalike` command line, demo, eval and benchmarks.

The only package allowed to import server and exporter code (import-linter holds this).
"""
