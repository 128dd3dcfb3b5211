"""`lookalike export` refuses bad input before any training or export, naming the flag and what it expected, and
never leaves a model folder half-written or written over another.

Most checks run with a catalogue that does not exist: a refusal has to come before the catalogue is read. The few
that need a real export use six small noise JPEGs at 32 px (seconds each).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from PIL import Image

from lookalike.embedder.preprocess import DLIB_HOG_ALIGNED, HAAR_FRONTAL_FACE, FaceCrop
from lookalike.quality.labelled_images import read_labelled_images

NOWHERE = "no-such-catalogue"
TINY = 32


def photos(root: Path, categories: tuple[str, ...] = ("bag", "shoe"), per_category: int = 3,
           seed: int = 0) -> Path:
    """root/<category>/<n>.jpg: small real JPEGs of noise (flat colours give the backbone nothing to see)."""
    rng = np.random.default_rng(seed)
    for category in categories:
        (root / category).mkdir(parents=True)
        for n in range(per_category):
            pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / category / f"{n}.jpg", quality=90)
    return root


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """main(argv)'s usage error (exit status 2), its last line."""
    from lookalike.exporter.__main__ import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def past_the_checks(argv: list[str]) -> None:
    """main(argv) accepts the flags: it goes on to read the catalogue, which is not there."""
    from lookalike.exporter.__main__ import main

    with pytest.raises(FileNotFoundError, match=NOWHERE):
        main(argv)


class ReachedExport(Exception):
    """Raised by the stand-in export: main got past every check."""


@pytest.fixture()
def export_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:
    """Stands in for export_default_model: records the settings main built, then stops the run."""
    from lookalike.exporter import export

    seen: list = []

    def stand_in(train: list, out_dir: Path, settings: export.ExportSettings, **kwargs: object) -> None:
        seen.append(settings)
        raise ReachedExport

    monkeypatch.setattr(export, "export_default_model", stand_in)
    yield seen


def leftovers(parent: Path, keep: set[str]) -> list[str]:
    """What is in `parent` besides `keep`: a hidden half-written model folder would show here."""
    return sorted(name for name in os.listdir(parent) if name not in keep)


# 1. A twin written over the fp32 model (or over the other twin).

@pytest.mark.parametrize("folders, flag", [
    (["--int8", "m"], "--int8 m"),
    (["--fp16", "other/../m"], "--fp16 other/../m"),  # the same folder spelt another way
    (["--fp16", "m/fp16"], "--fp16 m/fp16"),  # inside it
    (["--int8", "twin", "--fp16", "twin"], "--fp16 twin"),
])
def test_twin_folders_must_be_apart_from_the_model_and_each_other(folders: list[str], flag: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    error = refused(["--catalog", NOWHERE, "--out", "m", *folders], capsys)
    assert f"{flag}: expected a folder apart from" in error and "one model would overwrite the other" in error
    assert not (tmp_path / "m").exists() and not (tmp_path / "twin").exists()


# 2. Numbers out of range.

@pytest.mark.parametrize("argv, expected", [
    (["--input-size", "0"], "argument --input-size: '0': expected a whole number, 32 or more"),
    (["--input-size", "31"], "argument --input-size: '31': expected a whole number, 32 or more"),
    (["--input-size", "64.5"], "argument --input-size: '64.5': expected a whole number, 32 or more"),
    (["--train-embedding", "cosface", "--val", "v", "--views", "0"],
     "argument --views: '0': expected a whole number, 1 or more"),
    (["--train-embedding", "cosface", "--val", "v", "--finetune-from", "13", "--batch-size", "0"],
     "argument --batch-size: '0': expected a whole number, 1 or more"),
    (["--train-embedding", "cosface", "--val", "v", "--epochs", "-3"],
     "argument --epochs: '-3': expected a whole number, 1 or more"),
    (["--int8", "q", "--calibration-images", "0"],
     "argument --calibration-images: '0': expected a whole number, 1 or more"),
    (["--max-per-category", "-1"], "argument --max-per-category: '-1': expected a whole number, 0 or more"),
    (["--face-crop", "--face-upsample", "-1"], "argument --face-upsample: '-1': expected a whole number, 0 or more"),
    (["--face-crop", "--face-margin", "-0.1"], "argument --face-margin: '-0.1': expected a finite number, 0 or more"),
    (["--face-crop", "--face-margin", "nan"], "argument --face-margin: 'nan': expected a finite number, 0 or more"),
    (["--face-crop", "--face-margin", "inf"], "argument --face-margin: 'inf': expected a finite number, 0 or more"),
    (["--train-embedding", "cosface", "--val", "v", "--finetune-from", "13", "--backbone-learning-rate", "0"],
     "argument --backbone-learning-rate: '0': expected a finite number above 0"),
    (["--train-embedding", "cosface", "--val", "v", "--finetune-from", "13", "--backbone-learning-rate", "nan"],
     "argument --backbone-learning-rate: 'nan': expected a finite number above 0"),
    (["--train-embedding", "cosface", "--val", "v", "--finetune-from", "-1"],
     "argument --finetune-from: '-1': expected a whole number, 0 or more"),
    (["--train-embedding", "cosface", "--val", "v", "--finetune-from", "16"],
     "--finetune-from 16: expected a block of efficientnet-lite0, 0-15"),
    (["--train-embedding", "cosface", "--val", "v", "--backbone", "lite2", "--finetune-from", "21"],
     "--finetune-from 21: expected a block of efficientnet-lite2, 0-20"),
])
def test_numbers_out_of_range_are_refused_naming_the_flag(argv: list[str], expected: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert refused(["--catalog", NOWHERE, "--out", "unused", *argv], capsys).endswith(expected)


@pytest.mark.parametrize("argv", [
    ["--input-size", "32"],
    ["--max-per-category", "0"],
    ["--train-embedding", "cosface", "--val", "v", "--finetune-from", "0"],
    ["--train-embedding", "cosface", "--val", "v", "--backbone", "lite1", "--finetune-from", "20"],
    ["--face-crop", "--face-margin", "0", "--face-upsample", "0"],
])
def test_numbers_at_the_edge_of_their_range_are_accepted(argv: list[str]) -> None:
    past_the_checks(["--catalog", NOWHERE, "--out", "unused", *argv])


# 3. Training flags that would be ignored.

FINE_TUNING_FLAGS = [
    (["--backbone-learning-rate", "1e-4"], "--backbone-learning-rate"),
    (["--batch-size", "32"], "--batch-size"),
    (["--ema-decay", "0.99"], "--ema-decay"),
    (["--train-batchnorm"], "--train-batchnorm"),
]


@pytest.mark.parametrize("argv, flag", [
    (["--finetune-from", "13"], "--finetune-from"),
    (["--views", "2"], "--views"),
    (["--epochs", "3"], "--epochs"),  # the category head alone has no epochs: L-BFGS to convergence
    *FINE_TUNING_FLAGS,
])
def test_training_flags_need_train_embedding(argv: list[str], flag: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    error = refused(["--catalog", NOWHERE, "--out", "unused", *argv], capsys)
    assert error.endswith(f"{flag} needs --train-embedding (without it nothing trains and {flag} would be ignored)")


@pytest.mark.parametrize("argv, flag", FINE_TUNING_FLAGS)
def test_fine_tuning_flags_need_finetune_from(argv: list[str], flag: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """With --train-embedding alone only the heads train, on cached frozen features, in their own batches."""
    error = refused(["--catalog", NOWHERE, "--out", "unused", "--train-embedding", "cosface", "--val", "v", *argv],
                    capsys)
    assert error.endswith(f"{flag} needs --finetune-from (without it only the heads train, on frozen features, "
                          f"and {flag} would be ignored)")


def test_views_and_epochs_count_when_only_the_heads_train() -> None:
    """Without --finetune-from the heads train on cached views for --epochs: both flags are used, and accepted."""
    from lookalike.exporter.__main__ import build_parser, training_settings

    argv = ["--catalog", NOWHERE, "--out", "unused", "--train-embedding", "cosface", "--val", "v", "--views", "3",
            "--epochs", "40"]
    past_the_checks(argv)
    settings = training_settings(build_parser().parse_args(argv))
    assert (settings.views, settings.head_epochs, settings.finetune_from) == (3, 40, None)


def test_views_are_refused_when_every_epoch_makes_fresh_ones(capsys: pytest.CaptureFixture[str]) -> None:
    error = refused(["--catalog", NOWHERE, "--out", "unused", "--train-embedding", "cosface", "--val", "v",
                     "--finetune-from", "0", "--views", "4"], capsys)
    assert error.endswith("--views 4: unused with --finetune-from 0, where every epoch makes fresh views")


def test_train_embedding_needs_val_before_any_photo_is_read(capsys: pytest.CaptureFixture[str]) -> None:
    """The export itself also refuses, but only after the trunk has run over every training photo."""
    error = refused(["--catalog", NOWHERE, "--out", "unused", "--train-embedding", "triplet"], capsys)
    assert error.endswith("--train-embedding triplet needs --val (validation photos: training stops early by them)")


def test_train_embedding_with_an_empty_val_list_is_refused(tmp_path: Path, export_settings: list,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "val.txt").write_text("")
    error = refused(["--catalog", str(photos(tmp_path / "train")), "--val", str(tmp_path / "val.txt"), "--out",
                     str(tmp_path / "m"), "--train-embedding", "cosface"], capsys)
    assert error.endswith(f"--val {tmp_path / 'val.txt'}: expected validation photos for --train-embedding, found none")
    assert not export_settings


def test_calibration_images_need_int8(capsys: pytest.CaptureFixture[str]) -> None:
    error = refused(["--catalog", NOWHERE, "--out", "unused", "--calibration-images", "64"], capsys)
    assert error.endswith("--calibration-images needs --int8 (it calibrates the int8 model)")


def test_a_training_device_needs_train_embedding(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Only training runs on --device: the export without it would quietly run on the CPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    error = refused(["--catalog", NOWHERE, "--out", "unused", "--device", "cuda"], capsys)
    assert error.endswith("--device cuda needs --train-embedding (only training runs on the device)")


# 4. Face flags without --face-crop.

@pytest.mark.parametrize("argv, flag", [
    (["--face-margin", "0.3"], "--face-margin"),
    (["--face-margin", str(FaceCrop.margin)], "--face-margin"),  # the default, given: still ignored
    (["--face-upsample", "1"], "--face-upsample"),
    (["--no-face", "whole-image"], "--no-face"),
    (["--no-face", "fail"], "--no-face"),
])
def test_face_flags_need_face_crop(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    error = refused(["--catalog", NOWHERE, "--out", "unused", *argv], capsys)
    assert error.endswith(f"{flag} needs --face-crop (without it no face is cropped and {flag} would be ignored)")


def test_face_upsample_needs_the_detector_that_upsamples(capsys: pytest.CaptureFixture[str]) -> None:
    error = refused(["--catalog", NOWHERE, "--out", "unused", "--face-crop", HAAR_FRONTAL_FACE, "--face-upsample",
                     "1"], capsys)
    assert error.endswith(f"--face-upsample needs --face-crop {DLIB_HOG_ALIGNED} ({HAAR_FRONTAL_FACE} does not "
                          "upsample)")


@pytest.mark.parametrize("argv, crop", [
    (["--face-crop"], FaceCrop()),
    (["--face-crop", HAAR_FRONTAL_FACE, "--face-margin", "0.2", "--no-face", "whole-image"],
     FaceCrop(detector=HAAR_FRONTAL_FACE, margin=0.2, no_face="whole_image")),
    (["--face-crop", "--face-upsample", "1"], FaceCrop(upsample=1)),
])
def test_face_flags_not_given_keep_the_face_crop_defaults(argv: list[str], crop: FaceCrop, tmp_path: Path,
                                                          export_settings: list) -> None:
    from lookalike.exporter.__main__ import main

    with pytest.raises(ReachedExport):
        main(["--catalog", str(photos(tmp_path / "train")), "--out", str(tmp_path / "m"), *argv])
    assert export_settings[0].face_crop == crop


# 5. Catalogues with nothing to tell apart.

def test_a_catalogue_of_one_category_is_refused_unless_one_category_is_asked_for(
        tmp_path: Path, export_settings: list, capsys: pytest.CaptureFixture[str]) -> None:
    """One category's head says 1.0 for every photo; --one-category is the deliberate way to one shard."""
    from lookalike.exporter.__main__ import main

    catalogue = photos(tmp_path / "train", categories=("shoe",))
    error = refused(["--catalog", str(catalogue), "--out", str(tmp_path / "m")], capsys)
    assert error.endswith(f"--catalog {catalogue}: one category (shoe): expected 2 or more for the category head to "
                          "tell apart, or --one-category NAME for a model with one shard")
    assert not export_settings
    with pytest.raises(ReachedExport):
        main(["--catalog", str(catalogue), "--out", str(tmp_path / "m"), "--one-category", "item"])


def test_an_empty_catalogue_is_refused(tmp_path: Path, export_settings: list,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """An empty list file read as no photos: the head's solver then failed on an empty tensor, a traceback."""
    (tmp_path / "train.txt").write_text("")
    error = refused(["--catalog", str(tmp_path / "train.txt"), "--out", str(tmp_path / "m")], capsys)
    assert error.endswith(f"--catalog {tmp_path / 'train.txt'}: expected labelled photos, found none")
    assert not export_settings


def test_a_face_crop_that_leaves_no_photo_is_an_error_naming_why(tmp_path: Path) -> None:
    """Noise has no face: with no_face 'fail' every photo is left out, and the export says so instead of failing
    in the head's solver; no model folder is left behind."""
    from lookalike.exporter.export import ExportSettings, export_default_model

    train = read_labelled_images(photos(tmp_path / "train"))
    settings = ExportSettings(input_size=TINY, parity_images=2, face_crop=FaceCrop(detector=HAAR_FRONTAL_FACE))
    with pytest.raises(ValueError, match="the face crop found a face in none of the 6 given"):
        export_default_model(train, tmp_path / "m", settings)
    assert leftovers(tmp_path, {"train"}) == []


# 6. Model folders written whole or not at all.

def test_a_folder_holding_something_other_than_a_model_is_never_written_over(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The export replaces --out whole: a folder of the user's own files given by mistake is refused (a model
    folder is replaced, once the new model is complete)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for flag in ("--out", "--int8", "--fp16"):
        folders = {"--out": str(tmp_path / "new"), flag: str(mine)}
        error = refused(["--catalog", NOWHERE, *[part for pair in folders.items() for part in pair]], capsys)
        assert error.endswith(f"{flag} {mine} holds files but no model (manifest.json): expected a new or empty "
                              "folder, or a model folder to replace")
    assert os.listdir(mine) == ["notes.txt"]
    model = tmp_path / "model"
    model.mkdir()
    (model / "manifest.json").write_text("{}")
    past_the_checks(["--catalog", NOWHERE, "--out", str(model)])


def test_a_file_given_as_a_model_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    error = refused(["--catalog", NOWHERE, "--out", str(tmp_path / "notes.txt")], capsys)
    assert error.endswith(f"--out {tmp_path / 'notes.txt'}: expected a folder to write the model in, not a file")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real export at 32 px of six noise photos, into a folder that held an older model and a stray file."""
    from lookalike.exporter.export import ExportSettings, export_default_model

    root = tmp_path_factory.mktemp("tiny")
    model = root / "model"
    model.mkdir()
    model.chmod(0o750)
    (model / "model.onnx").write_bytes(b"old graph")
    (model / "stale.txt").write_text("from the older model")
    export_default_model(read_labelled_images(photos(root / "train")), model,
                         ExportSettings(input_size=TINY, parity_images=2))
    return model


def test_an_export_replaces_an_older_model_folder_whole(tiny_model: Path) -> None:
    """The library's callers (`lookalike demo` rebuilds its model in place) get the new model and nothing of the
    old one, in a folder with the old one's permissions, and nothing half-written beside it."""
    from lookalike.codec import file_sha256, read_manifest

    assert sorted(os.listdir(tiny_model)) == ["manifest.json", "model.onnx"]
    assert read_manifest(tiny_model).sha256 == file_sha256(tiny_model / "model.onnx")
    assert tiny_model.stat().st_mode & 0o777 == 0o750
    assert leftovers(tiny_model.parent, {"model", "train"}) == []


def test_a_failed_export_leaves_the_model_folder_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parity refused after the new graph was written: the model already there is untouched (the new graph no
    longer lands on the old one's, beside the old manifest), and the half-written folder is removed."""
    from lookalike.exporter import export

    model = tmp_path / "m"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"old graph")
    (model / "manifest.json").write_text('{"sha256": "of the old graph"}')

    def failing_parity(*args: object, **kwargs: object) -> None:
        raise export.ExportError("ONNX Runtime differs from Torch")

    monkeypatch.setattr(export, "check_parity", failing_parity)
    with pytest.raises(export.ExportError):
        export.export_default_model(read_labelled_images(photos(tmp_path / "train")), model,
                                    export.ExportSettings(input_size=TINY, parity_images=2))
    assert (model / "model.onnx").read_bytes() == b"old graph"
    assert (model / "manifest.json").read_text() == '{"sha256": "of the old graph"}'
    assert leftovers(tmp_path, {"m", "train"}) == []


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_a_failed_twin_leaves_its_folder_as_it_was(precision: str, tiny_model: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from lookalike.exporter import quantize

    twin = tmp_path / precision
    twin.mkdir()
    (twin / "model.onnx").write_bytes(b"old twin")

    def failing_measure(*args: object, **kwargs: object) -> None:
        raise RuntimeError("drift measurement failed")

    monkeypatch.setattr(quantize, "measure_twin", failing_measure)
    images = read_labelled_images(tiny_model.parent / "train")
    with pytest.raises(RuntimeError, match="drift measurement failed"):
        if precision == "int8":
            quantize.quantize_model(tiny_model, twin, images, images)
        else:
            quantize.half_precision_model(tiny_model, twin, images)
    assert os.listdir(twin) == ["model.onnx"] and (twin / "model.onnx").read_bytes() == b"old twin"
    assert leftovers(tmp_path, {precision}) == []


# 7. A photo that does not decode.

@pytest.mark.parametrize("damage, message", [
    (lambda jpeg: b"not a photo at all", "is not a readable image (UnidentifiedImageError)"),
    (lambda jpeg: jpeg[: len(jpeg) // 3], "could not be decoded, the data is truncated or corrupt"),
])
def test_a_photo_that_does_not_decode_ends_the_export_in_one_line_naming_it(
        damage: Callable[[bytes], bytes], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As `lookalike eval` ends on a query photo it cannot embed: one line with the path, exit status 2, no
    traceback, and no model folder (nor a half-written one) left behind."""
    from lookalike.exporter.__main__ import main

    catalogue = photos(tmp_path / "train")
    bad = catalogue / "shoe" / "1.jpg"
    bad.write_bytes(damage(bad.read_bytes()))
    assert main(["--catalog", str(catalogue), "--out", str(tmp_path / "m"), "--input-size", str(TINY)]) == 2
    err = capsys.readouterr().err
    assert f"lookalike export: {bad} {message}" in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert leftovers(tmp_path, {"train"}) == []
