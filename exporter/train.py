"""Metric learning on the catalogue: an embedding head trained on frozen, cached backbone features.

The backbone stays frozen (2 CPU cores cannot fine-tune it in reasonable time here); its pooled features
for every training photo and its mirror image are computed once with ONNX Runtime and cached, so an
epoch costs milliseconds. The head is seed 004's Linear-ReLU-Linear to 256-d, trained on the relevance
labels (grocery: fine classes) with either a CosFace-style proxy loss (normalised softmax with an
additive margin) or a batch-hard triplet loss, with early stopping on validation mAP@10.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clients.metrics import average_precision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    loss: str = "cosface"  # or "triplet"
    dimension: int = 256
    hidden: int = 1024
    epochs: int = 200
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    scale: float = 16.0
    margin: float = 0.2
    patience: int = 25
    seed: int = 0


def projection_head(features: int, hidden: int, dimension: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, dimension))


def retrieval_map(queries: np.ndarray, query_labels: Sequence[str], catalogue: np.ndarray,
                  catalogue_labels: Sequence[str], k: int = 10) -> float:
    """Mean standard AP@k of exact cosine search (unit vectors)."""
    totals: dict[str, int] = {}
    for label in catalogue_labels:
        totals[label] = totals.get(label, 0) + 1
    ranked = np.argsort(-(queries @ catalogue.T), axis=1)[:, :k]
    labels = np.asarray(catalogue_labels)
    return float(np.mean([average_precision(list(labels[row] == label), k, totals.get(label, 0))
                          for row, label in zip(ranked, query_labels)]))


def project(head: nn.Module, features: np.ndarray) -> np.ndarray:
    """Unit-length embeddings of backbone features through a trained head."""
    with torch.no_grad():
        return F.normalize(head(torch.from_numpy(np.asarray(features, dtype=np.float32))), dim=1).numpy()


def _batch_hard_triplet(embeddings: torch.Tensor, targets: torch.Tensor, margin: float) -> torch.Tensor:
    distance = torch.cdist(embeddings, embeddings)
    same = targets[:, None] == targets[None, :]
    hardest_positive = (distance * same).max(1).values
    hardest_negative = (distance + same * 1e4).min(1).values
    return F.relu(hardest_positive - hardest_negative + margin).mean()


def train_embedding_head(train_features: np.ndarray, train_labels: Sequence[str], val_features: np.ndarray,
                         val_labels: Sequence[str], catalogue_features: np.ndarray, catalogue_labels: Sequence[str],
                         settings: TrainSettings = TrainSettings()) -> tuple[nn.Module, dict]:
    """The head with the best validation mAP@10 (val photos searched against the catalogue's features)."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    classes = {label: i for i, label in enumerate(sorted(set(train_labels)))}
    x = torch.from_numpy(np.asarray(train_features, dtype=np.float32))
    y = torch.tensor([classes[label] for label in train_labels])
    head = projection_head(x.shape[1], settings.hidden, settings.dimension)
    proxies = nn.Parameter(torch.randn(len(classes), settings.dimension) * 0.01)
    parameters = list(head.parameters()) + ([proxies] if settings.loss == "cosface" else [])
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)

    def embed(features: np.ndarray) -> np.ndarray:
        head.eval()
        return project(head, features)

    baseline = retrieval_map(val_features, val_labels, catalogue_features, catalogue_labels)
    best = (-1.0, 0, {k: v.clone() for k, v in head.state_dict().items()})
    history = []
    for epoch in range(1, settings.epochs + 1):
        head.train()
        order = torch.from_numpy(rng.permutation(len(x)))
        for start in range(0, len(x), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            embeddings = F.normalize(head(x[batch]), dim=1)
            if settings.loss == "cosface":
                cosine = embeddings @ F.normalize(proxies, dim=1).T
                logits = settings.scale * (cosine - settings.margin * F.one_hot(y[batch], len(classes)))
                loss = F.cross_entropy(logits, y[batch])
            else:
                loss = _batch_hard_triplet(embeddings, y[batch], settings.margin)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        score = retrieval_map(embed(val_features), val_labels, embed(catalogue_features), catalogue_labels)
        history.append(round(score, 4))
        if score > best[0]:
            best = (score, epoch, {k: v.clone() for k, v in head.state_dict().items()})
        elif epoch - best[1] >= settings.patience:
            break
    head.load_state_dict(best[2])
    head.eval()
    report = {"loss": settings.loss, "frozen_val_mAP@10": round(baseline, 4), "best_val_mAP@10": round(best[0], 4),
              "best_epoch": best[1], "epochs_run": len(history)}
    log.info("embedding head (%s): validation mAP@10 %.4f -> %.4f at epoch %d", settings.loss, baseline, best[0],
             best[1])
    return head, report
