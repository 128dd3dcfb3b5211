"""The searcher's Prometheus metrics: per-shard sizes read at scrape time, and probes per shard."""
from __future__ import annotations

from typing import Iterator

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric

SHARD_PROBES = Counter("lookalike_searcher_shard_probes_total", "Searches that probed each shard", ["category"])


class CatalogueCollector:
    """Reads GetStats' figures when Prometheus scrapes, so they are never stale and cost nothing between."""

    def __init__(self, catalogue: object) -> None:
        self._catalogue = catalogue

    def collect(self) -> Iterator[Metric]:
        stats = self._catalogue.stats()
        families = {
            "items": GaugeMetricFamily("lookalike_searcher_shard_items", "Live items per shard", labels=["category"]),
            "deleted": GaugeMetricFamily("lookalike_searcher_shard_deleted_slots",
                                         "Deleted slots not yet reused per shard", labels=["category"]),
            "capacity": GaugeMetricFamily("lookalike_searcher_shard_capacity", "HNSW slots allocated per shard",
                                          labels=["category"]),
            "memory_bytes": GaugeMetricFamily("lookalike_searcher_shard_memory_bytes", "Estimated index memory",
                                              labels=["category"]),
            "snapshot_age_seconds": GaugeMetricFamily("lookalike_searcher_shard_snapshot_age_seconds",
                                                      "Seconds since the shard's last snapshot (-1: none)",
                                                      labels=["category"]),
        }
        for row in stats.shards:
            # A part of a split category is its own series: category#part/parts.
            label = row["category"] if row["parts"] == 1 else f"{row['category']}#{row['part']}/{row['parts']}"
            for key, family in families.items():
                family.add_metric([label], row[key])
        yield from families.values()
        yield GaugeMetricFamily("lookalike_searcher_items", "Live items in all shards", value=stats.items)
        yield GaugeMetricFamily("lookalike_searcher_sequence", "Sequence number of the last write this searcher applied",
                                value=stats.applied_sequence)
        yield GaugeMetricFamily("lookalike_searcher_store_sequence", "Sequence number of the store's last committed write",
                                value=stats.store_sequence)
        yield GaugeMetricFamily("lookalike_searcher_replication_lag_seconds",
                                "How long the oldest committed write not yet applied here has waited",
                                value=stats.lag_seconds)
