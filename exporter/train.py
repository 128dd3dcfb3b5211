"""Metric learning on the catalogue: an embedding head, optionally with the backbone's last blocks or all of it.

The frozen part of the backbone runs once per training view with ONNX Runtime and its output is cached
(exporter/export.py, `cache_activations`), so an epoch only runs what is trained. Frozen backbone: the
cache holds pooled features and an epoch costs milliseconds. Fine-tuning from block `finetune_from`: the
cache holds that block's input activations, and the blocks from there on, the head conv, seed 004's
Linear-ReLU-Linear embedding head to 256-d and a category layer train together; BatchNorm statistics stay
frozen (small batches, few photos). Fine-tuning from block 0 is the whole network, meant for a GPU: the
cache holds the decoded photos and each epoch sees a fresh random view of each (augmented on the device);
BatchNorm statistics can train there too (`train_batchnorm`, batches of 128 on a GPU). Losses: a
CosFace-style proxy loss (normalised softmax with an additive margin) or a batch-hard triplet loss on the
relevance labels (grocery: fine classes), plus cross-entropy on the categories through a category layer
that exists for its gradient on the blocks (the served category head is fitted afterwards by
exporter/head.py). Early stopping on validation mAP@10; seeded.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lookalike.quality.retrieval_metrics import average_precision
from lookalike.exporter.augment import random_views_batch
from lookalike.exporter.efficientnet_lite import EfficientNetLite
from lookalike.exporter.model import scaled_input

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    loss: str = "cosface"  # or "triplet"
    dimension: int = 256
    hidden: int = 1024
    # The heads first train on the frozen backbone's cached features: cheap epochs, many of them.
    head_epochs: int = 200
    head_batch_size: int = 256
    head_patience: int = 25
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    scale: float = 16.0
    margin: float = 0.2
    seed: int = 0
    # Blocks from this one on train with the heads; None keeps the whole backbone frozen, 0 trains all of it.
    finetune_from: int | None = None
    # Cached views per training photo: 0 as served, 1 mirrored, 2+ random crops with colour jitter
    # (from block 0 one view is cached and a fresh random one is made every epoch instead).
    views: int = 2
    # Fine-tuning (heads and blocks together, from the fitted heads) runs at one lower learning rate.
    epochs: int = 15
    batch_size: int = 64
    patience: int = 4
    backbone_learning_rate: float = 1e-4
    category_weight: float = 1.0
    # Where training runs ("cpu", "cuda"); on CUDA the training passes run in bfloat16 autocast.
    device: str = "cpu"
    # Update BatchNorm statistics from the training batches (else the ImageNet ones stay, affine terms train).
    train_batchnorm: bool = False
    # While fine-tuning, validate and keep an exponential moving average of the tower's and embedding head's
    # weights (this decay per batch) instead of the weights as trained; None keeps the weights as trained.
    ema_decay: float | None = None


# Fine-tuning's defaults: block 13 on is the trade-off measured on 2 CPU cores (BENCHMARKS.md).
FINETUNE_DEFAULTS = {"finetune_from": 13, "views": 4}


class Tower(nn.Module):
    """Cached trunk output -> unit-length backbone features.

    split None: the cache holds the frozen backbone's features, passed through. split 1 to the backbone's
    last block (15 in lite0, 20 in lite1 and lite2): it holds the activations entering that block, and the
    blocks from there on run. split 0: it holds uint8 photos; in training mode each gets a fresh random
    view, and the whole network runs. BatchNorm statistics stay as trained on ImageNet unless
    `train_batchnorm`.
    """

    def __init__(self, backbone: EfficientNetLite, split: int | None, seed: int = 0,
                 train_batchnorm: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.split = split
        self.seed = seed
        self.train_batchnorm = train_batchnorm
        self._generator: torch.Generator | None = None

    def forward(self, cached: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            return cached
        if self.split == 0:
            pixels = random_views_batch(cached, self._views_generator(cached.device)) if self.training else cached
            return F.normalize(self.backbone.features(scaled_input(pixels)), dim=1)
        return F.normalize(self.backbone.top(cached, self.split), dim=1)

    def train(self, mode: bool = True) -> Tower:
        super().train(mode)
        if not self.train_batchnorm:
            self.backbone.eval()
        return self

    def trainable(self) -> list[nn.Parameter]:
        return [] if self.split is None else self.backbone.top_parameters(self.split)

    def _views_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device).manual_seed(self.seed)
        return self._generator


def projection_head(features: int, hidden: int, dimension: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, dimension))


def held_out_map(val_embedded: np.ndarray, val_labels: Sequence[str], train_embedded: np.ndarray,
                   train_labels: Sequence[str]) -> float:
    """What early stopping maximises: mAP@10 of the validation photos searched among the training photos when
    they share labels (products seen in training), else among each other, each left out of its own results
    (open set: people never seen in training, whom the training photos cannot match)."""
    if set(val_labels) & set(train_labels):
        return retrieval_map(val_embedded, val_labels, train_embedded, train_labels)
    return retrieval_map(val_embedded, val_labels, val_embedded, val_labels, leave_one_out=True)


def retrieval_map(queries: np.ndarray, query_labels: Sequence[str], catalogue: np.ndarray,
                  catalogue_labels: Sequence[str], k: int = 10, leave_one_out: bool = False) -> float:
    """Mean standard AP@k of exact cosine search (unit vectors); with `leave_one_out` the queries are the
    catalogue and each is removed from its own results."""
    totals: dict[str, int] = {}
    for label in catalogue_labels:
        totals[label] = totals.get(label, 0) + 1
    scores = queries @ catalogue.T
    if leave_one_out:
        np.fill_diagonal(scores, -np.inf)
        k = min(k, scores.shape[1] - 1)
    if k < scores.shape[1]:
        # Partition first: early stopping runs this every epoch, over up to 60,000 catalogue items.
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        ranked = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)
    else:
        ranked = np.argsort(-scores, axis=1)[:, :k]
    labels = np.asarray(catalogue_labels)
    return float(np.mean([average_precision(list(labels[row] == label), k, totals.get(label, 0) - leave_one_out)
                          for row, label in zip(ranked, query_labels)]))


def on_device(batch: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A numpy batch on `device`: float16 activations become float32, uint8 photos stay uint8."""
    tensor = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
    return tensor.float() if tensor.dtype == torch.float16 else tensor


def run_batched(module: nn.Module, inputs: np.ndarray, batch_size: int = 128,
                device: torch.device | str = "cpu") -> np.ndarray:
    """module(inputs) in eval mode without gradients, batch by batch, on `device` (the module moves there)."""
    module.to(device).eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            outputs.append(module(on_device(inputs[start:start + batch_size], device)).float().cpu())
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, 0), np.float32)


def project(head: nn.Module, features: np.ndarray) -> np.ndarray:
    """Unit-length embeddings of backbone features through a trained head."""
    return run_batched(nn.Sequential(head, _Normalize()), features)


class _Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


def _batch_hard_triplet(embeddings: torch.Tensor, targets: torch.Tensor, margin: float) -> torch.Tensor:
    distance = torch.cdist(embeddings, embeddings)
    same = targets[:, None] == targets[None, :]
    hardest_positive = (distance * same).max(1).values
    hardest_negative = (distance + same * 1e4).min(1).values
    return F.relu(hardest_positive - hardest_negative + margin).mean()


@dataclass
class _Heads:
    """What trains on top of the tower: the embedding head, its class proxies and the category layer."""

    embedding: nn.Module
    proxies: nn.Parameter
    category: nn.Linear

    def state(self) -> dict:
        return copy.deepcopy({"embedding": self.embedding.state_dict(), "proxies": self.proxies.detach().clone(),
                              "category": self.category.state_dict()})

    def restore(self, state: dict) -> None:
        self.embedding.load_state_dict(state["embedding"])
        self.category.load_state_dict(state["category"])
        with torch.no_grad():
            self.proxies.copy_(state["proxies"])


def _fit(tower: Tower, train_views: np.ndarray, labels: torch.Tensor, categories: torch.Tensor, heads: _Heads,
         val_cached: np.ndarray, val_labels: Sequence[str], catalogue_labels: Sequence[str], settings: TrainSettings,
         epochs: int, patience: int, batch_size: int, learning_rate: float,
         score_to_beat: float = -1.0) -> tuple[float, int, list[float]]:
    """One training phase with early stopping on its own best validation mAP@10; leaves tower and heads at
    that best, or, when no epoch beat `score_to_beat`, as they came in (reported as best epoch 0).
    Patience counts from the phase's own best: fine-tuning often dips below the fitted heads first."""
    rng = np.random.default_rng(settings.seed)
    device = torch.device(settings.device)
    parameters = [*heads.embedding.parameters(), heads.proxies, *heads.category.parameters(), *tower.trainable()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=settings.weight_decay)
    classes = len(heads.proxies)
    trained = nn.ModuleDict({"tower": tower, "embedding": heads.embedding})
    # What is validated, kept and exported: the weights as trained, or their moving average. BatchNorm
    # statistics are averaged only where they train.
    averaged = (AveragedModel(trained, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay),
                              use_buffers=settings.train_batchnorm)
                if settings.ema_decay is not None and tower.trainable() else None)
    served = trained if averaged is None else averaged.module

    def validation_map(model: nn.ModuleDict) -> float:
        embed = nn.Sequential(model["tower"], model["embedding"], _Normalize())
        return held_out_map(run_batched(embed, val_cached, device=device), val_labels,
                            run_batched(embed, train_views[0], device=device), catalogue_labels)

    def snapshot(score: float, epoch: int) -> tuple[float, int, dict, dict | None]:
        return score, epoch, heads.state(), copy.deepcopy(served.state_dict()) if tower.trainable() else None

    entry = snapshot(score_to_beat, 0)
    best = (-1.0, *entry[1:])
    history: list[float] = []
    views, count = train_views.shape[0], train_views.shape[1]
    for epoch in range(1, epochs + 1):
        started = time.monotonic()
        tower.train()
        heads.embedding.train()
        order = rng.permutation(count)
        chosen_view = rng.integers(0, views, size=count)
        for start in range(0, count, batch_size):
            batch = order[start:start + batch_size]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                features = tower(on_device(train_views[chosen_view[batch], batch], device))
                embeddings = F.normalize(heads.embedding(features).float(), dim=1)
            features = features.float()
            targets = labels[batch]
            if settings.loss == "cosface":
                cosine = embeddings @ F.normalize(heads.proxies, dim=1).T
                logits = settings.scale * (cosine - settings.margin * F.one_hot(targets, classes))
                loss = F.cross_entropy(logits, targets)
            else:
                loss = _batch_hard_triplet(embeddings, targets, settings.margin)
            loss = loss + settings.category_weight * F.cross_entropy(heads.category(features), categories[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if averaged is not None:
                averaged.update_parameters(trained)
        score = validation_map(served)
        history.append(round(score, 4))
        if averaged is not None:
            log.info("epoch %d: validation mAP@10 %.4f averaged, %.4f as trained (%.0f s)", epoch, score,
                     validation_map(trained), time.monotonic() - started)
        elif tower.trainable():
            log.info("epoch %d: validation mAP@10 %.4f (%.0f s)", epoch, score, time.monotonic() - started)
        if score > best[0]:
            best = snapshot(score, epoch)
        elif epoch - best[1] >= patience:
            break
    if best[0] < score_to_beat:
        best = entry
    heads.restore(best[2])
    if best[3] is not None:
        trained.load_state_dict(best[3])
    heads.embedding.eval()
    tower.eval()
    return best[0], best[1], history


def train_embedding(tower: Tower, train_views: np.ndarray, train_labels: Sequence[str],
                    train_categories: Sequence[int], val_cached: np.ndarray, val_labels: Sequence[str],
                    settings: TrainSettings = TrainSettings()) -> tuple[nn.Module, dict]:
    """Trains the embedding head (and the tower's top when it has one) on cached trunk outputs.

    train_views: [views, N, ...], view 0 the photos as served, which also form the validation catalogue;
    val_cached: [M, ...] validation photos, searched against that catalogue for early stopping. When the
    tower trains, the heads are first fitted on its frozen output (fast, cached) so that the backbone's
    first gradients come from a sensible head rather than a random one. Leaves the tower at its best
    epoch and returns (embedding head, report).
    """
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    classes = {label: i for i, label in enumerate(sorted(set(train_labels)))}
    labels = torch.tensor([classes[label] for label in train_labels], device=device)
    categories = torch.as_tensor(np.asarray(train_categories, dtype=np.int64)).to(device)
    frozen_tower = Tower(tower.backbone, None)
    frozen_views = (train_views if not tower.trainable()
                    else np.stack([run_batched(tower, v, device=device) for v in train_views]))
    frozen_val = val_cached if not tower.trainable() else run_batched(tower, val_cached, device=device)
    feature_dim = frozen_views.shape[-1]
    # Built on the CPU and then moved, so that a seed gives the same initial heads on every device.
    heads = _Heads(projection_head(feature_dim, settings.hidden, settings.dimension).to(device),
                   nn.Parameter((torch.randn(len(classes), settings.dimension) * 0.01).to(device)),
                   nn.Linear(feature_dim, int(categories.max()) + 1).to(device))
    baseline = held_out_map(frozen_val, val_labels, frozen_views[0], train_labels)
    score, epoch, history = _fit(frozen_tower, frozen_views, labels, categories, heads, frozen_val, val_labels,
                                 train_labels, settings, settings.head_epochs, settings.head_patience,
                                 settings.head_batch_size, settings.learning_rate)
    views = len(train_views) if tower.split != 0 else "fresh each epoch"
    report = {"loss": settings.loss, "views": views, "frozen_val_mAP@10": round(baseline, 4),
              "head_val_mAP@10": round(score, 4), "head_best_epoch": epoch, "head_epochs_run": len(history)}
    log.info("embedding head (%s) on frozen features: validation mAP@10 %.4f -> %.4f at epoch %d", settings.loss,
             baseline, score, epoch)
    del frozen_views, frozen_val
    if tower.trainable():
        score, epoch, history = _fit(tower, train_views, labels, categories, heads, val_cached, val_labels,
                                     train_labels, settings, settings.epochs, settings.patience, settings.batch_size,
                                     settings.backbone_learning_rate, score_to_beat=score)
        report.update({"finetune_from": settings.finetune_from, "finetuned_val_mAP@10": round(score, 4),
                       "finetune_best_epoch": epoch, "finetune_epochs_run": len(history)})
        log.info("fine-tuned from block %d: validation mAP@10 %.4f at epoch %d", settings.finetune_from, score, epoch)
    return heads.embedding, report
