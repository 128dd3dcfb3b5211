"""Fashion-MNIST (Debian package dataset-fashion-mnist) written out as a labelled PNG folder.

Gives every fresh machine a real catalogue without downloads: ROOT/<split>/<category>/<index>.png.
Splits: "train" (the first images of each class of the training file), "test" (the test file), and
"validation": the last images of each class of the training file, for early stopping and fitting at
export, so that the test images stay the queries nothing was tuned on. The training file holds 6,000
images per class, so "train" up to 5,000 per class and "validation" up to 1,000 never share an image.
"""
from __future__ import annotations

import gzip
import struct
from collections import defaultdict
from pathlib import Path

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CATEGORIES = ["t-shirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
              "ankle-boot"]
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_FILES["validation"] = _FILES["train"]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped) as a numpy array."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    _, dtype_code, dims = struct.unpack(">HBB", data[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path}: IDX element type {dtype_code:#x}, expected unsigned bytes (0x08)")
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def materialize(dest: Path, split: str, per_category: int = 0, source: Path = DEBIAN_DIR) -> Path:
    """Writes the first `per_category` images of each class of `split` (0: all; for "validation" the last
    ones of the training file) as PNGs named by their index in their file; returns the folder.

    Idempotent: files already there are kept, so a second run is instant.
    """
    from PIL import Image

    if split not in _FILES:
        raise ValueError(f"split {split!r}: expected one of {sorted(_FILES)}")
    images_file, labels_file = (source / name for name in _FILES[split])
    if not images_file.is_file():
        raise FileNotFoundError(f"{images_file} is missing: install it with `apt-get install dataset-fashion-mnist`")
    images, labels = read_idx(images_file), read_idx(labels_file)
    root = Path(dest) / split
    written: dict[int, int] = defaultdict(int)
    order = range(len(labels) - 1, -1, -1) if split == "validation" else range(len(labels))
    prefix = "train" if split == "validation" else split
    for index in order:
        pixels, label = images[index], labels[index]
        if per_category and written[label] >= per_category:
            continue
        written[label] += 1
        path = root / CATEGORIES[label] / f"{prefix}-{index:05d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return root
