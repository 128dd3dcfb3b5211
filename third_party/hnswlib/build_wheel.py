"""Builds the hnswlib wheel the searcher runs on: PyPI's hnswlib 0.8.0 with a smaller label-lock table.

Every hnswlib index allocates MAX_LABEL_OPERATION_LOCKS (65,536) mutexes, 2.6 MB, however few items it
holds (nmslib/hnswlib#328, open since 2021; the maintainer proposed sizing it to the data). The searcher
keeps one index per category shard, so 20 categories cost 52 MB and a catalogue of 500 categories 1.3 GB
before its first item. The locks only stripe concurrent writes to labels (label & (locks - 1)): a shard
writes under its own write lock, and only its bulk inserts run on several threads, so 1,024 stripes leave
those threads as unlikely to meet as 65,536 do in practice, and an index costs 40 KB of them.

And `Index.save_index` raises when its file could not be written whole: it wrote through a stream whose
failures it never checked, so a full disk left a truncated index that the searcher took for a snapshot.

`Index.save_index` also lets go of Python's GIL while it writes, as knn_query and add_items already do: it
held it for the whole write (about 80 ms for 60,000 256-d items), stalling every other thread of the searcher,
searches of other shards and gRPC's, at each snapshot. The searcher saves under the shard's read lock, so no
write changes the index meanwhile.

Nothing else changes: the same sdist (checked against its sha256), the same setup.py (which compiles with
-march=native unless HNSWLIB_NO_NATIVE is set), and the version gets a local label,
0.8.0+locks1024.savenogil.savechecked, so `pip show hnswlib` tells the builds apart and `==0.8.0` in requirements.lock still matches it.

Usage: python third_party/hnswlib/build_wheel.py WHEEL_DIR   (prints the wheel's path)
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.8.0"
SDIST_SHA256 = "cb6d037eedebb34a7134e7dc78966441dfd04c9cf5ee93911be911ced951c44c"
LABEL_LOCKS = 1024
LOCAL_VERSION = f"{VERSION}+locks{LABEL_LOCKS}.savenogil.savechecked"
# The interpreter's tag too: a wheel kept from another Python (PYTHON=python3.12 make setup) does not install here.
WHEEL_PATTERN = f"hnswlib-{LOCAL_VERSION}-cp{sys.version_info.major}{sys.version_info.minor}-*.whl"


def _replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"{path}: expected {old!r} exactly once; is this hnswlib {VERSION}?")
    path.write_text(text.replace(old, new))


def build(wheel_dir: Path) -> Path:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    built = next(wheel_dir.glob(WHEEL_PATTERN), None)
    if built is not None:  # the venv's install step re-runs when pyproject.toml changes; the build need not
        return built
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", "hnswlib",
                        "--dest", str(work), f"hnswlib=={VERSION}"], check=True)
        sdist = work / f"hnswlib-{VERSION}.tar.gz"
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise SystemExit(f"{sdist.name}: sha256 {digest}, expected {SDIST_SHA256}")
        with tarfile.open(sdist) as archive:
            archive.extractall(work, filter="data")
        source = work / f"hnswlib-{VERSION}"
        _replace_once(source / "hnswlib" / "hnswalg.h", "MAX_LABEL_OPERATION_LOCKS = 65536;",
                      f"MAX_LABEL_OPERATION_LOCKS = {LABEL_LOCKS};")
        _replace_once(source / "python_bindings" / "bindings.cpp",
                      "    void saveIndex(const std::string &path_to_index) {\n        appr_alg->saveIndex(path_to_index);",
                      "    void saveIndex(const std::string &path_to_index) {\n        py::gil_scoped_release l;\n"
                      "        appr_alg->saveIndex(path_to_index);")
        _replace_once(source / "hnswlib" / "hnswalg.h",
                      "                output.write(linkLists_[i], linkListSize);\n        }\n        output.close();\n",
                      "                output.write(linkLists_[i], linkListSize);\n        }\n        output.close();\n"
                      "        if (!output) throw std::runtime_error(\"Cannot write the index to \" + location);\n")
        _replace_once(source / "setup.py", f"__version__ = '{VERSION}'", f"__version__ = '{LOCAL_VERSION}'")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheel_dir),
                        str(source)], check=True)
    return next(wheel_dir.glob(WHEEL_PATTERN))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.strip().splitlines()[-1])
    print(build(Path(sys.argv[1])))
