"""The soak's 60-second version: both servers under a mixed load with auth on, sampled every 5 s.

Its memory slope is a figure for BENCHMARKS.md (the 30-minute run), not asserted here: 60 s on a shared
2-core machine is too short and too noisy for a slope. What must hold at any length: no call fails, every
operation of the mix is served, and memory is sampled for both servers throughout.
"""
from __future__ import annotations

from pathlib import Path

from lookalike.tools.bench_soak import OPERATIONS, soak


def test_sixty_second_soak_with_auth_serves_everything(model_dir: Path, grocery_val: list) -> None:
    photos = [image.read_bytes() for image in grocery_val[:64]]
    report = soak(model_dir, photos, seconds=60, sample_seconds=5, clients=4, catalogue_items=200)
    assert report.failed == 0, report.failures
    assert set(report.served_by_operation) == set(OPERATIONS) and report.served > 100
    assert len(report.samples) == 12 and all(s.served > 0 for s in report.samples)
    assert all(s.embedder_rss_mib > 50 and s.searcher_rss_mib > 20 for s in report.samples)
