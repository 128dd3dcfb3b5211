"""Labelled image sets and the retrieval metrics measured on them: shared by the exporter and the tools."""
