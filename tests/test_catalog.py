"""Labelled collections: category folders and grocery-style list files."""
from __future__ import annotations

from pathlib import Path

import pytest

from lookalike.quality.labelled_images import categories_of, read_labelled_images
from tests.conftest import CLOTHING, GROCERY, needs_datasets


def test_folder_layout(tmp_path: Path) -> None:
    for category, names in {"hat": ["a.jpg", "b.PNG"], "shoes": ["nested/c.webp"]}.items():
        for name in names:
            (tmp_path / category / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / category / name).write_bytes(b"x")
    (tmp_path / "hat" / "notes.txt").write_text("not an image")
    (tmp_path / "hat" / "folder.jpg").mkdir()  # not an image file
    # A photo whose link is broken is listed (indexing reports it as failed), not left out without a word.
    (tmp_path / "shoes" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    images = read_labelled_images(tmp_path)
    assert [(i.item_id, i.category, i.label) for i in images] == [
        ("hat/a", "hat", "hat"), ("hat/b", "hat", "hat"), ("shoes/gone", "shoes", "shoes"),
        ("shoes/nested/c", "shoes", "shoes")]


def test_list_file_with_class_names(tmp_path: Path) -> None:
    (tmp_path / "classes.csv").write_text("Class Name,Class ID,Coarse Class Name,Coarse Class ID,Iconic,Desc\n"
                                          "Granny-Smith,1,Apple,0,/x.jpg,/x.txt\n")
    (tmp_path / "train.txt").write_text("train/Apple/g1.jpg, 1, 0\n\n")
    (image,) = read_labelled_images(tmp_path / "train.txt")
    assert (image.item_id, image.category, image.label) == ("train/Apple/g1", "Apple", "Granny-Smith")
    assert image.path == tmp_path / "train" / "Apple" / "g1.jpg"


def test_malformed_list_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_text("a.jpg, 1, 0\nb.jpg 2\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected 'path, fine_id, coarse_id'"):
        read_labelled_images(tmp_path / "bad.txt")


@needs_datasets
def test_real_sets() -> None:
    grocery = read_labelled_images(GROCERY / "train.txt")
    assert len(grocery) == 2640 and len(categories_of(grocery)) == 43  # the README says 42; classes.csv has ids 0-42
    assert len({i.label for i in grocery}) == 81 and all(i.path.is_file() for i in grocery[:50])
    clothing = read_labelled_images(CLOTHING / "validation")
    assert len(clothing) == 341 and len(categories_of(clothing)) == 10


def test_two_files_that_would_share_an_id_are_refused(tmp_path: Path) -> None:
    """Ids are paths without their extension: bag/a.png and bag/a.jpg were both indexed as item bag/a, one
    replacing the other, while the run reported both as indexed."""
    from PIL import Image

    (tmp_path / "bag").mkdir()
    for name in ("a.png", "a.jpg", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "bag" / name)
    with pytest.raises(ValueError, match=r"a\.jpg and .*a\.png would both be item 'bag/a'"):
        read_labelled_images(tmp_path)
    (tmp_path / "bag" / "a.jpg").unlink()
    assert [image.item_id for image in read_labelled_images(tmp_path)] == ["bag/a", "bag/b"]


def test_a_validation_or_query_photo_also_in_the_catalogue_is_refused(tmp_path: Path) -> None:
    """Nothing kept a photo from being both a catalogue (training) photo and a validation photo or query: the
    exporter then fitted on what it trained on, and eval scored queries that found themselves. The same bytes
    on both sides are refused by both commands, before anything starts."""
    import subprocess
    import sys

    from PIL import Image

    for split, shade in (("train", 0), ("val", 100)):
        for category in ("bag", "shoe"):
            (tmp_path / split / category).mkdir(parents=True)
            for n in range(2):
                Image.new("RGB", (8, 8), (shade + n, len(category), 0)).save(tmp_path / split / category / f"{n}.png")
    (tmp_path / "val" / "shoe" / "copy.png").write_bytes((tmp_path / "train" / "bag" / "1.png").read_bytes())
    train, val = tmp_path / "train", tmp_path / "val"
    for args, what in ((["export", "--catalog", str(train), "--val", str(val), "--out", str(tmp_path / "model")],
                        "photos of --val also in --catalog"),
                       (["eval", "--model", str(tmp_path / "model"), "--catalog", str(train), "--queries", str(val)],
                        "queries also in the catalogue (each would find itself)")):
        if args[0] == "eval":
            (tmp_path / "model").mkdir(exist_ok=True)
            (tmp_path / "model" / "manifest.json").write_text("{}")
        result = subprocess.run([sys.executable, "-m", "lookalike.tools.cli", *args], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 2, result.stderr[-1500:]
        assert f"{what}: 1 (the same bytes; e.g. {val / 'shoe' / 'copy.png'} is {train / 'bag' / '1.png'})" \
            in result.stderr
