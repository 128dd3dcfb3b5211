"""The routing rule, shared by the searcher and the sharded client: which shards a search probes.

Probability routing probes categories in order of the classifier's probability until the probed mass
reaches the threshold or the shard cap. Each probed shard returns its own top k and the merge keeps the
best k, so a shard's share of the final answer follows its scores (and its prior, when prior_weight is
set). Every probed shard searches with the full ef: scaling ef down by relative probability was
measured to cost recall@10 0.954 -> 0.894 (30k synthetic items, 20 shards) for no gain in throughput
through gRPC. Categories without a shard hold no items: their probability counts as covered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Sequence


@dataclass(frozen=True)
class Probe:
    category: str
    probability: float
    ef: int


def plan_probability_routing(probabilities: Sequence[tuple[str, float]], existing: Collection[str],
                             threshold: float, max_shards: int, k: int, ef: int) -> list[Probe]:
    """The probes for one query under probability routing (see the module docstring)."""
    ranked = sorted(probabilities, key=lambda pair: (-pair[1], pair[0]))
    probes: list[Probe] = []
    covered = 0.0
    for category, probability in ranked:
        if covered >= threshold or len(probes) >= max_shards:
            break
        covered += probability
        if category in existing:
            probes.append(Probe(category, probability, max(k, ef)))
    return probes


def plan_explicit(categories: Sequence[str], existing: Collection[str], ef: int) -> tuple[list[Probe], list[str]]:
    """Probes for explicitly named categories (each with the full ef), and the names that have no shard."""
    unique = list(dict.fromkeys(categories))
    return ([Probe(c, 1.0, ef) for c in unique if c in existing], [c for c in unique if c not in existing])


def plan_all(existing: Collection[str], ef: int) -> list[Probe]:
    """Every shard with the full ef."""
    return [Probe(c, 0.0, ef) for c in sorted(existing)]
