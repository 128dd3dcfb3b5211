"""Fine-tuning machinery on real photos: trunk/top split, cached activations, augmentation, what trains.

Training runs on the CPU here; `--device cuda` runs the same code on a GPU (measured in BENCHMARKS.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from lookalike.exporter.augment import random_view, random_views_batch, training_views
from lookalike.exporter.efficientnet_lite import load_imagenet_model
from lookalike.exporter.export import ExportSettings, cache_activations, decode_files, export_default_model, trunk_session
from lookalike.exporter.model import scaled_input
from lookalike.exporter.train import Tower, TrainSettings, run_batched, train_embedding
from lookalike.codec import read_manifest


def test_trunk_then_top_is_the_whole_backbone(grocery_val: list) -> None:
    backbone = load_imagenet_model()
    x = scaled_input(torch.from_numpy(decode_files(grocery_val[:3], 224)))
    with torch.no_grad():
        whole = backbone.features(x)
        for split in (0, 11, 13, 16):
            assert torch.allclose(backbone.top(backbone.trunk(x, split), split), whole, atol=1e-5)


def test_cached_onnx_activations_feed_the_torch_top(grocery_val: list, tmp_path) -> None:
    """The fp16 activations ONNX Runtime caches give the same features as the whole model in Torch."""
    backbone = load_imagenet_model()
    images = grocery_val[:4]
    cached = cache_activations(trunk_session(backbone, 13, 224, tmp_path), images, 224)
    assert cached.shape == (1, 4, 192, 7, 7) and cached.dtype == np.float16
    with torch.no_grad():
        expected = F.normalize(backbone.features(scaled_input(torch.from_numpy(decode_files(images, 224)))), dim=1)
    assert np.abs(run_batched(Tower(backbone, 13), cached[0]) - expected.numpy()).max() < 2e-3
    frozen = cache_activations(trunk_session(backbone, None, 224, tmp_path), images, 224)[0]
    assert np.abs(frozen - expected.numpy()).max() < 1e-4


def test_training_views_are_seeded_and_keep_shape(grocery_val: list) -> None:
    pixels = decode_files(grocery_val[:2], 224)
    assert training_views(pixels, 0, np.random.default_rng(0)) is pixels
    assert np.array_equal(training_views(pixels, 1, np.random.default_rng(0)), pixels[:, :, ::-1])
    first = training_views(pixels, 2, np.random.default_rng(7))
    assert first.shape == pixels.shape and first.dtype == np.uint8
    assert np.array_equal(first, training_views(pixels, 2, np.random.default_rng(7)))
    assert not np.array_equal(first, pixels)
    assert not np.array_equal(random_view(pixels[0], np.random.default_rng(1)),
                              random_view(pixels[0], np.random.default_rng(2)))


# What fine-tuning from block 14 trains in Lite0: its last two blocks, the head conv and its BatchNorm.
TRAINED_FROM_14 = ("_blocks.14.", "_blocks.15.", "_conv_head.", "_bn1.")


@dataclass(frozen=True)
class SmallFinetuningSet:
    """18 photos of 3 grocery products (6 to validate) as Lite0's frozen trunk up to block 14 outputs them."""

    views: np.ndarray
    val_cached: np.ndarray
    labels: list[str]
    categories: list[int]
    val_labels: list[str]

    @classmethod
    def of(cls, grocery_train: list, grocery_val: list, scratch: Path) -> SmallFinetuningSet:
        products = sorted({image.label for image in grocery_val})[:3]
        train = [image for image in grocery_train if image.label in products][:18]
        validation = [image for image in grocery_val if image.label in products][:6]
        trunk = trunk_session(load_imagenet_model(), 14, 224, scratch)
        categories = sorted({image.category for image in train})
        return cls(cache_activations(trunk, train, 224, views=2), cache_activations(trunk, validation, 224)[0],
                   [image.label for image in train], [categories.index(image.category) for image in train],
                   [image.label for image in validation])

    def finetuned(self, **settings) -> tuple[dict, dict]:
        """Fine-tunes a fresh Lite0 from block 14 for 2 epochs; returns (its weights after, the report)."""
        backbone = load_imagenet_model()
        chosen = TrainSettings(finetune_from=14, views=2, head_epochs=3, epochs=2, batch_size=6,
                               backbone_learning_rate=1e-3, **settings)
        _, report = train_embedding(Tower(backbone, 14), self.views, self.labels, self.categories, self.val_cached,
                                    self.val_labels, chosen)
        return {name: value.clone() for name, value in backbone.state_dict().items()}, report


@pytest.mark.slow
def test_finetuning_trains_only_the_blocks_after_the_split(grocery_train: list, grocery_val: list, tmp_path) -> None:
    """Blocks before the split, and every BatchNorm statistic, stay as loaded; blocks after it move."""
    before = load_imagenet_model().state_dict()
    after, report = SmallFinetuningSet.of(grocery_train, grocery_val, tmp_path).finetuned(patience=3)
    assert report["finetune_from"] == 14
    # Epoch 0 would mean the fitted heads alone were best and no trained weight was kept.
    assert report["finetune_best_epoch"] > 0 and report["finetuned_val_mAP@10"] >= report["head_val_mAP@10"]
    for name, value in before.items():
        if not name.startswith(TRAINED_FROM_14) or "running_" in name or "num_batches" in name:
            assert torch.equal(after[name], value), name
    moved = [name for name in before if name.startswith(TRAINED_FROM_14) and name.endswith("weight")
             and not torch.equal(after[name], before[name])]
    assert any(name.startswith("_blocks.14.") for name in moved) and any(name.startswith("_blocks.15.")
                                                                         for name in moved)


def test_device_views_scale_a_flat_photo_only_in_brightness() -> None:
    """Crops and mirrors of a flat grey photo are flat, contrast and saturation leave grey as it is, so each
    view is the same grey times a brightness factor within +-25%."""
    grey = torch.full((16, 32, 32, 3), 100, dtype=torch.uint8)
    views = random_views_batch(grey, torch.Generator().manual_seed(0)).reshape(16, -1)
    assert torch.allclose(views, views[:, :1].expand_as(views), atol=1e-3)
    assert views.min() >= 75 - 1e-3 and views.max() <= 125 + 1e-3
    assert len(set(views[:, 0].round().tolist())) > 8


def test_device_views_of_real_photos_are_seeded(grocery_val: list) -> None:
    pixels = torch.from_numpy(decode_files(grocery_val[:4], 96))
    first = random_views_batch(pixels, torch.Generator().manual_seed(3))
    assert first.shape == pixels.shape and first.dtype == torch.float32
    assert torch.equal(first, random_views_batch(pixels, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, random_views_batch(pixels, torch.Generator().manual_seed(4)))
    assert 0 <= first.min() and first.max() <= 255
    assert (first - pixels.float()).abs().mean() > 5  # every photo is cropped, maybe mirrored, and recoloured


@pytest.mark.parametrize("train_batchnorm", [False, True])
def test_whole_network_tower_augments_in_training_only(grocery_val: list, train_batchnorm: bool) -> None:
    """From block 0 the tower reads photos: in eval mode it is exactly the served backbone; in training mode it
    sees random views, and BatchNorm statistics move only with train_batchnorm."""
    backbone = load_imagenet_model()
    pixels = decode_files(grocery_val[:4], 96)
    tower = Tower(backbone, 0, train_batchnorm=train_batchnorm)
    with torch.no_grad():
        served = F.normalize(backbone.features(scaled_input(torch.from_numpy(pixels))), dim=1).numpy()
    assert np.abs(run_batched(tower, pixels) - served).max() < 1e-5
    statistics = backbone._bn0.running_mean.clone()
    tower.train()
    with torch.no_grad():
        trained_view = tower(torch.from_numpy(pixels)).numpy()
    assert np.abs(trained_view - served).max() > 1e-2
    assert torch.equal(backbone._bn0.running_mean, statistics) != train_batchnorm
    assert len(tower.trainable()) == len([p for name, p in backbone.named_parameters() if not name.startswith("_fc")])


@pytest.mark.slow
def test_whole_network_export_from_photos(grocery_train: list, grocery_val: list, tmp_path) -> None:
    """The exporter's block-0 path: photos decoded instead of cached activations, trained, exported, verified."""
    labels = sorted({image.label for image in grocery_val})[:3]
    train = [image for image in grocery_train if image.label in labels][:12]
    validation = [image for image in grocery_val if image.label in labels][:6]
    embedding = TrainSettings(finetune_from=0, head_epochs=3, epochs=1, patience=1, batch_size=6,
                              backbone_learning_rate=1e-3)
    manifest = export_default_model(train, tmp_path, ExportSettings(input_size=96, embedding=embedding),
                                    validation=validation)
    assert manifest.parity.passed and manifest.embedding_dim == 256 and manifest.input.height == 96
    assert "whole network fine-tuned" in manifest.backbone and "'views': 'fresh each epoch'" in manifest.backbone
    assert read_manifest(tmp_path).model_id == manifest.model_id


def test_exporter_refuses_a_device_it_cannot_use(capsys) -> None:
    """--device cuda without a usable GPU stops before any photo is read, naming the flag and what it expects."""
    from lookalike.exporter.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so --device cuda is valid here")
    with pytest.raises(SystemExit) as stopped:
        main(["--catalog", "no-such-folder", "--out", "unused", "--train-embedding", "cosface",
              "--finetune-from", "0", "--device", "cuda"])
    assert stopped.value.code == 2
    assert "--device cuda: expected cpu, or cuda on a machine where torch sees a GPU" in capsys.readouterr().err


@pytest.mark.parametrize("decay", ["1", "-0.1", "fast"])
def test_exporter_refuses_an_ema_decay_outside_0_to_1(decay: str, capsys) -> None:
    from lookalike.exporter.__main__ import main

    with pytest.raises(SystemExit) as stopped:
        main(["--catalog", "no-such-folder", "--out", "unused", "--train-embedding", "cosface",
              "--finetune-from", "11", "--ema-decay", decay])
    assert stopped.value.code == 2
    assert f"--ema-decay: {decay!r}: expected a number from 0 up to, not including, 1" in capsys.readouterr().err


def test_ema_decay_reaches_the_fine_tuning_settings() -> None:
    from lookalike.exporter.__main__ import build_parser, training_settings

    args = build_parser().parse_args(["--catalog", "c", "--out", "o", "--train-embedding", "cosface",
                                      "--finetune-from", "11", "--ema-decay", "0.99"])
    assert training_settings(args).ema_decay == 0.99
    assert training_settings(build_parser().parse_args(["--catalog", "c", "--out", "o", "--train-embedding",
                                                         "cosface"])).ema_decay is None


def test_early_stopping_scores_unseen_people_among_themselves() -> None:
    """Open set (faces): validation labels absent from training are scored leave-one-out among the validation
    photos, not against training photos they can never match; shared labels keep the catalogue search."""
    import numpy as np

    from lookalike.exporter.train import held_out_map

    val = np.array([[1.0, 0.0], [0.96, 0.28], [0.0, 1.0], [0.28, 0.96]], np.float32)
    train = np.array([[0.6, 0.8]], np.float32)
    # a1's nearest other photo is a2 (rank 1), b1's is b2: AP@10 1 for every query.
    assert held_out_map(val, ["a", "a", "b", "b"], train, ["z"]) == pytest.approx(1.0)
    # Swap two labels: each photo's nearest other has another label; its own comes 2nd (first and third photo)
    # or 3rd (second and fourth): (1/2 + 1/3 + 1/2 + 1/3) / 4.
    assert held_out_map(val, ["a", "b", "b", "a"], train, ["z"]) == pytest.approx(5 / 12)
    # Shared labels: searched among the training photos (here the only one is an "a").
    assert held_out_map(val, ["a", "a", "b", "b"], train, ["a"]) == pytest.approx(0.5)


@pytest.mark.slow
def test_weight_averaging_validates_and_keeps_the_average(grocery_train: list, grocery_val: list, tmp_path) -> None:
    """--ema-decay: decay 0 is the weights as trained, bit for bit; a real decay keeps other weights, between
    where fine-tuning started and where it went."""
    photos = SmallFinetuningSet.of(grocery_train, grocery_val, tmp_path)

    def finetuned(ema_decay: float | None) -> tuple[dict, dict]:
        # patience beyond the epochs: the last epoch is kept whatever its score, so the runs compare
        return photos.finetuned(patience=3, ema_decay=ema_decay)

    start = load_imagenet_model().state_dict()
    as_trained, report = finetuned(None)
    assert report["finetune_best_epoch"] > 0, "fine-tuning never beat the heads: nothing to compare"
    decay_zero, _ = finetuned(0.0)
    assert all(torch.equal(value, decay_zero[name]) for name, value in as_trained.items())
    averaged, averaged_report = finetuned(0.9)
    assert averaged_report["finetune_best_epoch"] > 0
    block = "_blocks.15._project_conv.weight"
    moved, moved_averaged = (as_trained[block] - start[block]).norm(), (averaged[block] - start[block]).norm()
    assert 0 < moved_averaged < moved
    for name, value in start.items():  # frozen blocks and BatchNorm statistics stay as loaded either way
        if not name.startswith(TRAINED_FROM_14) or "running_" in name:
            assert torch.equal(averaged[name], value), name
