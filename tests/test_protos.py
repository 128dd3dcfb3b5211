"""The checked-in stubs are exactly what the pinned generator makes from the .proto files."""
from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run([str(ROOT / "scripts" / "generate_protos.sh"), str(tmp_path)], check=True, env=env)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    checked_in = sorted(p.relative_to(ROOT / "protos") for p in (ROOT / "protos").rglob("*_pb2*.py*"))
    assert generated == checked_in
    stale = [str(p) for p in generated if not filecmp.cmp(tmp_path / p, ROOT / "protos" / p, shallow=False)]
    assert not stale, f"stale stubs, run `make protos`: {stale}"


def test_stubs_import_as_lookalike_v1() -> None:
    from lookalike.v1 import embedder_pb2_grpc, searcher_pb2

    assert searcher_pb2.DESCRIPTOR.package == "lookalike.v1"
    assert hasattr(embedder_pb2_grpc, "EmbedderStub")


def test_protobuf_runs_on_the_upb_backend() -> None:
    """The C (upb) backend parses and serialises messages: the pure-Python one is many times slower."""
    from google.protobuf.internal import api_implementation

    assert api_implementation.Type() == "upb"
