"""Packaging and architecture: the wheel installs one import root, and import-linter's contracts hold.

import-linter runs here over the built wheel, which is what ships and what these tests can copy and
break on purpose; in the checkout `lint-imports` works too, over the strict editable install's tree.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    return next(out.glob("lookalike-*.whl"))


def _unpack(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(dest)
    return dest


def _lint(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(ROOT / "pyproject.toml")], cwd=site, text=True,
                          capture_output=True, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})


def test_the_wheel_installs_only_the_lookalike_import_root(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top_level = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert top_level == {"lookalike"}
    for package in ("v1", "client", "embedder", "searcher", "exporter", "tools", "serving", "quality"):
        assert f"lookalike/{package}/__init__.py" in names


def test_import_linter_contracts_hold(wheel: Path, tmp_path: Path) -> None:
    result = _lint(_unpack(wheel, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Contracts: [1-9]\d* kept, 0 broken", result.stdout), result.stdout


def lint_with(wheel: Path, tmp_path: Path, module: str, line: str) -> subprocess.CompletedProcess:
    """import-linter over a copy of the wheel where `line` is appended to `module` (a path in lookalike/)."""
    site = _unpack(wheel, tmp_path)
    path = site / "lookalike" / module
    path.write_text((path.read_text() if path.exists() else "") + f"\n{line}  # noqa\n")
    return _lint(site)


def test_a_client_import_of_server_code_breaks_a_contract(wheel: Path, tmp_path: Path) -> None:
    result = lint_with(wheel, tmp_path, "client/facade.py", "from lookalike.searcher.catalogue import Catalogue")
    assert result.returncode != 0
    assert "The client library imports only the contracts and its own code BROKEN" in result.stdout
    assert "lookalike.client.facade -> lookalike.searcher.catalogue" in result.stdout


def test_serving_importing_torch_breaks_a_contract(wheel: Path, tmp_path: Path) -> None:
    result = lint_with(wheel, tmp_path, "embedder/trained.py", "import torch")
    assert result.returncode != 0
    assert "Serving never imports the exporter, the tools or torch BROKEN" in result.stdout


def test_the_searcher_runs_on_the_hnswlib_build_with_the_small_lock_table() -> None:
    """`make` installs hnswlib from third_party/hnswlib/build_wheel.py (PyPI's build spends 2.6 MB of label
    locks on every shard), and GetStats' memory estimate counts the locks the installed build allocates."""
    from lookalike.searcher.shard import HNSWLIB_LABEL_LOCKS

    spec = importlib.util.spec_from_file_location("build_wheel", ROOT / "third_party" / "hnswlib" / "build_wheel.py")
    assert spec is not None and spec.loader is not None
    build_wheel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_wheel)
    assert importlib.metadata.version("hnswlib") == build_wheel.LOCAL_VERSION
    assert HNSWLIB_LABEL_LOCKS == build_wheel.LABEL_LOCKS
