"""Which shards a search probes, and with how much effort.

Probability routing probes categories in order of the classifier's probability until the probed mass
reaches the threshold or the shard cap; the most probable shard searches with the full ef and each
other shard with ef scaled by its probability relative to the top one (never below k, which hnswlib
enforces anyway). Categories without a shard hold no items: their probability counts as covered.
"""
from __future__ import annotations

import math
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
    top = None
    for category, probability in ranked:
        if covered >= threshold or len(probes) >= max_shards:
            break
        covered += probability
        if category not in existing:
            continue
        top = top if top is not None else probability
        share = probability / top if top > 0 else 1.0
        probes.append(Probe(category, probability, max(k, math.ceil(ef * share))))
    return probes


def plan_explicit(categories: Sequence[str], existing: Collection[str], ef: int) -> tuple[list[Probe], list[str]]:
    """Probes for explicitly named categories (each with the full ef), and the names that have no shard."""
    unique = list(dict.fromkeys(categories))
    return ([Probe(c, 1.0, ef) for c in unique if c in existing], [c for c in unique if c not in existing])


def plan_all(existing: Collection[str], ef: int) -> list[Probe]:
    """Every shard with the full ef."""
    return [Probe(c, 0.0, ef) for c in sorted(existing)]
