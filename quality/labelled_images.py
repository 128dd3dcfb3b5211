"""Labelled image collections: a folder per category, or a list file such as grocery's train.txt.

Free of heavy imports: the client's `index` and `eval` commands and the exporter's training share it.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".pgm"}


@dataclass(frozen=True)
class LabelledImage:
    """One image file with its category (the shard) and its relevance label (what counts as a match)."""

    item_id: str
    path: Path
    category: str
    label: str

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()


def read_labelled_images(source: Path) -> list[LabelledImage]:
    """All labelled images in `source`, sorted by id.

    `source` is either a folder laid out as ROOT/<category>/**/<image>, or a list file whose lines are
    `relative/path.jpg, fine_id, coarse_id` (grocery's format): then the category is the coarse class,
    the label the fine class, named by a classes.csv beside the list when there is one. grocery's
    classes.csv itself reads as the iconic catalogue: one clean product image per fine class.
    """
    source = Path(source)
    if source.is_dir():
        images = _read_folder(source)
    elif source.is_file() and source.suffix == ".csv":
        images = _read_iconic(source)
    elif source.is_file():
        images = _read_list_file(source)
    else:
        raise FileNotFoundError(f"catalogue {source} is neither a folder nor a list file")
    _refuse_shared_ids(images)
    return images


def refuse_shared_photos(first: Sequence[LabelledImage], second: Sequence[LabelledImage], what: str) -> None:
    """Raises ValueError when a photo of `second` has the same bytes as one of `first` (a query that would find
    itself, a validation photo the model trained on); `what` names the two sides in the message."""
    digests = {hashlib.sha256(image.read_bytes()).digest(): image for image in first}
    shared = [(digests[digest], image) for image in second
              if (digest := hashlib.sha256(image.read_bytes()).digest()) in digests]
    if shared:
        one, other = shared[0]
        raise ValueError(f"{what}: {len(shared)} (the same bytes; e.g. {other.path} is {one.path}), and the two sets "
                         "must not share photos")


def _refuse_shared_ids(images: Sequence[LabelledImage]) -> None:
    """Ids are paths without their extension: a.jpg and a.png beside each other would be stored as one item."""
    first: dict[str, Path] = {}
    for image in images:
        other = first.setdefault(image.item_id, image.path)
        if other != image.path:
            raise ValueError(f"{other} and {image.path} would both be item {image.item_id!r} (ids are paths without "
                             "their extension): rename one")


def _read_folder(root: Path) -> list[LabelledImage]:
    images = []
    for category_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(category_dir.rglob("*")):
            # A broken link is listed too: indexing then reports it failed instead of leaving it out unsaid.
            if path.suffix.lower() in IMAGE_SUFFIXES and (path.is_file() or path.is_symlink()):
                item_id = path.relative_to(root).with_suffix("").as_posix()
                images.append(LabelledImage(item_id, path, category_dir.name, category_dir.name))
    if not images:
        raise ValueError(f"catalogue folder {root} has no images in category subfolders (ROOT/<category>/*.jpg)")
    return images


def _read_list_file(list_file: Path) -> list[LabelledImage]:
    fine_names, coarse_names = _read_class_names(list_file.parent / "classes.csv")
    images = []
    with list_file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = [field.strip() for field in line.split(",")]
            if len(fields) != 3:
                raise ValueError(f"{list_file}:{number}: expected 'path, fine_id, coarse_id', got {line.strip()!r}")
            relative, fine_id, coarse_id = fields
            path = list_file.parent / relative
            images.append(LabelledImage(
                item_id=Path(relative).with_suffix("").as_posix(),
                path=path,
                category=coarse_names.get(coarse_id, coarse_id),
                label=fine_names.get(fine_id, fine_id),
            ))
    return sorted(images, key=lambda image: image.item_id)


def _read_iconic(classes_csv: Path) -> list[LabelledImage]:
    """grocery's classes.csv -> its iconic images (category = coarse class, label = fine class)."""
    images = []
    with classes_csv.open(encoding="utf-8", newline="") as handle:
        rows = csv.reader(handle)
        next(rows, None)
        for row in rows:
            if len(row) >= 5 and row[4].strip():
                relative = row[4].strip().lstrip("/")
                images.append(LabelledImage(Path(relative).with_suffix("").as_posix(), classes_csv.parent / relative,
                                            category=row[2].strip(), label=row[0].strip()))
    return sorted(images, key=lambda image: image.item_id)


def _read_class_names(classes_csv: Path) -> tuple[dict[str, str], dict[str, str]]:
    """grocery's classes.csv: fine name, fine id, coarse name, coarse id, ... -> id-to-name maps."""
    if not classes_csv.is_file():
        return {}, {}
    fine: dict[str, str] = {}
    coarse: dict[str, str] = {}
    with classes_csv.open(encoding="utf-8", newline="") as handle:
        rows = csv.reader(handle)
        next(rows, None)
        for row in rows:
            if len(row) >= 4:
                fine[row[1].strip()] = row[0].strip()
                coarse[row[3].strip()] = row[2].strip()
    return fine, coarse


def categories_of(images: list[LabelledImage]) -> list[str]:
    """The sorted distinct categories of a collection."""
    return sorted({image.category for image in images})


def in_one_category(images: list[LabelledImage], category: str) -> list[LabelledImage]:
    """The images with one category for all, each keeping its label (faces: one shard, label = person)."""
    return [replace(image, category=category) for image in images]
