"""Lookalike's contracts: generated lookalike.v1 stubs plus the wire helpers every component shares."""
