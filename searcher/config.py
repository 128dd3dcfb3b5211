"""The searcher's settings: one frozen dataclass, from command-line flags with LOOKALIKE_SEARCHER_* env fallbacks."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lookalike.codec import read_manifest
from lookalike.routing import DEFAULT_MAX_SHARDS, DEFAULT_THRESHOLD, MAX_PRIOR_WEIGHT, RoutingDefaults
from lookalike.serving.settings import check_serving_settings, parse_config

# A third of the 15 s after which the shard map takes a silent replica as gone (Store.LIVE_SECONDS): two
# heartbeats may be late without the replica dropping out.
MAX_FOLLOW_INTERVAL = 5.0

ENV_PREFIX = "LOOKALIKE_SEARCHER_"


@dataclass(frozen=True)
class SearcherConfig:
    """Everything the searcher needs; defaults suit catalogues up to a few million items per pod."""

    data_dir: Path
    address: str = "[::]:50052"
    # Where items live: empty for the SQLite file in data_dir (one searcher), or a postgresql:// DSN
    # that replicas share (data_dir then holds only this replica's index snapshots).
    store: str = ""
    # Seconds to wait for a PostgreSQL store at start-up (and for a pooled connection per request).
    store_timeout: float = 30.0
    # With a shared store: seconds between polls when no commit notification arrives (bounds the lag
    # when one is lost), and how long removals are kept for replicas that are behind.
    follow_interval: float = 1.0
    tombstone_retention: float = 3600.0
    # Shared store: this replica's group (all replicas of a group serve the same categories), the gRPC
    # target clients reach the group at (published in the shard map), and how long a category that moved
    # away stays served here for clients still holding the old map.
    group: str = "default"
    advertise: str = ""
    move_grace: float = 30.0
    # Shared store: a category of this group holding more items than this is split into parts by a hash
    # of item id, placed on groups like categories, searched in parallel and merged (0: never split).
    max_shard_items: int = 0
    # HNSW graph degree and build breadth (hnswlib's M and ef_construction).
    m: int = 16
    ef_construction: int = 200
    # The least search breadth of every request: a request's ef may widen it, never narrow it; hnswlib never
    # searches with less than k.
    ef: int = 64
    # Shards with at most this many items are searched exactly (brute force) rather than through HNSW.
    exact_below: int = 2048
    # Comma-separated attributes whose values are numbers: Upsert checks them, filters compare them.
    numeric_attributes: str = ""
    # A filter with at most filter_exact_factor * sqrt(ef * items) matches in a shard searches them exactly
    # instead of through the graph (measured with `lookalike bench filters`, BENCHMARKS.md; 0: never).
    filter_exact_factor: float = 4.0
    # Queries per SearchBatch call.
    max_batch_queries: int = 256
    # Threads searching one query's shards in parallel (0: one per CPU the cgroup quota allows; 1: in turn).
    probe_threads: int = 0
    # A query searching at least this many shards (global search, say) screens them all at
    # screen_ef_fraction of its ef, then searches at full ef only those holding its best k (0: never).
    screen_from_shards: int = 8
    screen_ef_fraction: float = 0.25
    # Capacity of a new shard; it doubles when full.
    initial_capacity: int = 1024
    max_k: int = 1000
    max_batch: int = 1000
    # Categories (each a shard with its own graph) a searcher takes: a write naming one more is refused per
    # item. Categories stay once created: without a cap, a client inventing names would grow memory unbounded.
    max_categories: int = 10_000
    max_dimension: int = 4096
    # Per item: how many attributes, and their keys and values together in bytes (memory per request).
    max_attributes: int = 64
    max_attribute_bytes: int = 16 * 1024
    # Probability routing defaults: probe until this much probability is covered, at most max_shards,
    # and merge by cosine + prior_weight * ln p(category).
    routing_threshold: float = DEFAULT_THRESHOLD
    routing_max_shards: int = DEFAULT_MAX_SHARDS
    routing_prior_weight: float = 0.0
    # A model folder whose manifest holds routing defaults fitted at export: they replace the three above.
    routing_model: Path | None = None
    # Seconds between background snapshots of changed shards (0: only at shutdown).
    snapshot_interval: float = 60.0
    max_message_bytes: int = 64 * 1024 * 1024
    grpc_workers: int = 16
    # RPCs in progress at once; gRPC answers RESOURCE_EXHAUSTED past it (0: unbounded).
    max_concurrent_rpcs: int = 256
    # Close each client connection after this long (GOAWAY; calls in flight get 30 s to finish), so
    # clients reconnect and spread over replicas added later (0: never).
    max_connection_age_seconds: float = 0.0
    grace_seconds: float = 10.0
    # Prometheus /metrics HTTP port; 0 serves none.
    metrics_port: int = 0
    # TLS for the gRPC port, and a plaintext health-only port (kubelet's grpc probes speak no TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # mTLS: clients must present a certificate signed by a CA in this PEM bundle.
    tls_client_ca: Path | None = None
    health_address: str = ""
    # ROLE SHA256_HEX lines (a Secret mount): every RPC then needs a bearer token of a high enough role.
    auth_tokens: Path | None = None
    # OpenTelemetry: send a span per RPC to this OTLP/gRPC collector (http://host:4317); empty: tracing off.
    otlp_endpoint: str = ""

    def __post_init__(self) -> None:
        check_serving_settings(self)
        for name in ("m", "ef_construction", "ef", "initial_capacity", "max_k", "max_batch", "max_dimension",
                     "max_attributes", "max_attribute_bytes", "max_batch_queries", "max_categories",
                     "routing_max_shards"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.follow_interval <= 0 or self.store_timeout <= 0:
            raise ValueError(f"follow_interval and store_timeout must be positive, got {self.follow_interval} "
                             f"and {self.store_timeout}")
        if self.follow_interval > MAX_FOLLOW_INTERVAL:
            # Heartbeats go out once per interval; a replica not heard from for Store.LIVE_SECONDS counts as gone.
            raise ValueError(f"follow_interval must be at most {MAX_FOLLOW_INTERVAL:g} seconds (a replica not heard "
                             f"from for 15 s counts as gone), got {self.follow_interval}")
        if not 0 < self.routing_threshold <= 1:
            raise ValueError(f"routing_threshold must be in (0, 1], got {self.routing_threshold}")
        if not 0 <= self.routing_prior_weight <= MAX_PRIOR_WEIGHT:
            raise ValueError(f"routing_prior_weight must be 0 to {MAX_PRIOR_WEIGHT}, got {self.routing_prior_weight}")
        if self.probe_threads < 0:
            raise ValueError(f"probe_threads must be 0 (one per CPU) or more, got {self.probe_threads}")
        if not self.filter_exact_factor >= 0:
            raise ValueError(f"filter_exact_factor must be 0 or more, got {self.filter_exact_factor}")
        if self.screen_from_shards < 0 or not 0 < self.screen_ef_fraction <= 1:
            raise ValueError(f"screen_from_shards must be 0 (never) or more and screen_ef_fraction in (0, 1], got "
                             f"{self.screen_from_shards} and {self.screen_ef_fraction}")

    def routing_defaults(self) -> RoutingDefaults:
        """The routing defaults: the routing model's fitted ones, else the routing_* settings."""
        if self.routing_model is not None:
            folder = self.routing_model.parent if self.routing_model.is_file() else self.routing_model
            fitted = RoutingDefaults.of_model(read_manifest(folder))
            if fitted is None:
                raise ValueError(f"routing_model {self.routing_model}: its manifest has no fitted routing defaults "
                                 "(export it with validation images)")
            return fitted
        return RoutingDefaults(self.routing_threshold, self.routing_max_shards, self.routing_prior_weight)

    @property
    def numeric_attribute_names(self) -> frozenset[str]:
        return frozenset(name.strip() for name in self.numeric_attributes.split(",") if name.strip())

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> "SearcherConfig":
        """Flags override LOOKALIKE_SEARCHER_<FLAG> environment variables, which override defaults."""
        return parse_config(cls, argv, prog="python -m lookalike.searcher", description="Serve the Lookalike Searcher over gRPC.",
                            env_prefix=ENV_PREFIX, flags={"data_dir": "data"},
                            helps={"data_dir": "data folder: the SQLite database and the index snapshots",
                                   "store": "empty: SQLite in --data; postgresql://user@host/db: PostgreSQL shared by replicas "
                                            "(libpq PG* variables apply, e.g. PGPASSWORD from a Secret)",
                                   "follow_interval": "shared store: seconds between polls without a notification and between heartbeats (at most 5)",
                                   "tombstone_retention": "shared store: seconds removals are kept for lagging replicas",
                                   "group": "shared store: this replica's group (replicas of a group serve the same "
                                            "categories)",
                                   "advertise": "shared store: the gRPC target clients reach this group at, e.g. "
                                                "dns:///searcher-a.ns.svc.cluster.local:50052",
                                   "move_grace": "shared store: seconds a category that moved away is still served",
                                   "exact_below": "search shards of at most this many items exactly (0: always HNSW)",
                                   "numeric_attributes": "comma-separated attributes whose values are numbers "
                                                         "(checked on Upsert; filters can compare them)",
                                   "filter_exact_factor": "search a shard's filter matches exactly when there are at "
                                                          "most this times sqrt(ef * shard items) (0: never)",
                                   "max_batch_queries": "queries per SearchBatch call",
                                   "max_categories": "categories (shards) this searcher takes; a write into one more "
                                                     "is refused per item",
                                   "routing_prior_weight": "probability routing: merge by cosine + this times "
                                                           "ln p(category) when a request leaves it unset",
                                   "routing_model": "model folder whose manifest's fitted routing defaults replace "
                                                    "--routing-threshold, --routing-max-shards and "
                                                    "--routing-prior-weight",
                                   "probe_threads": "threads searching one query's shards in parallel (0: one per "
                                                    "CPU the cgroup quota allows; 1: one after another)",
                                   "max_shard_items": "shared store: split a category past this many items into parts "
                                                      "(0: never)",
                                   "tls_cert": "PEM certificate chain: serve gRPC over TLS",
                                   "tls_key": "PEM private key for --tls-cert",
                                   "tls_client_ca": "PEM CA bundle: require client certificates signed by it (mTLS)",
                                   "auth_tokens": "file of 'ROLE SHA256_HEX' lines (roles read, write, admin): "
                                                  "require bearer tokens",
                                   "otlp_endpoint": "OTLP/gRPC collector for trace spans, e.g. "
                                                    "http://otel-collector:4317 (empty: off)",
                                   "health_address": "extra plaintext host:port serving only grpc.health.v1"})
