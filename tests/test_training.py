"""Fine-tuning machinery on real photos: trunk/top split, cached activations, augmentation, what trains."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from exporter.augment import random_view, training_views
from exporter.efficientnet_lite import load_imagenet_model
from exporter.export import cache_activations, decode_files, trunk_session
from exporter.model import scaled_input
from exporter.train import Tower, TrainSettings, run_batched, train_embedding


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


@pytest.mark.slow
def test_finetuning_trains_only_the_blocks_after_the_split(grocery_train: list, grocery_val: list, tmp_path) -> None:
    """Blocks before the split, and every BatchNorm statistic, stay as loaded; blocks after it move."""
    labels = sorted({image.label for image in grocery_val})[:3]
    train = [image for image in grocery_train if image.label in labels][:18]
    validation = [image for image in grocery_val if image.label in labels][:6]
    backbone = load_imagenet_model()
    before = {name: value.clone() for name, value in backbone.state_dict().items()}
    trunk = trunk_session(backbone, 14, 224, tmp_path)
    views = cache_activations(trunk, train, 224, views=2)
    val_cached = cache_activations(trunk, validation, 224)[0]
    categories = sorted({image.category for image in train})
    settings = TrainSettings(finetune_from=14, views=2, head_epochs=3, epochs=2, patience=2, batch_size=6,
                             backbone_learning_rate=1e-3)
    head, report = train_embedding(Tower(backbone, 14), views, [image.label for image in train],
                                   [categories.index(image.category) for image in train], val_cached,
                                   [image.label for image in validation], settings)
    assert report["finetune_from"] == 14 and 0 <= report["finetuned_val_mAP@10"] <= 1
    after = backbone.state_dict()
    trained = ("_blocks.14.", "_blocks.15.", "_conv_head.", "_bn1.")
    for name, value in before.items():
        if not name.startswith(trained) or "running_" in name or "num_batches" in name:
            assert torch.equal(after[name], value), name
    if report["finetune_best_epoch"] > 0:  # epoch 0 would mean the fitted heads alone were best
        assert any(not torch.equal(after[name], before[name]) for name in before
                   if name.startswith(trained) and name.endswith("weight"))
