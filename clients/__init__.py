"""Lookalike's Python client library: channels, typed clients, the facade, asyncio, sharding, indexing.

Imports only the contracts (lookalike.v1, lookalike.codec, lookalike.routing, lookalike.filter_text) and its own
modules.
"""
