"""Fitting the category head on frozen, L2-normalised backbone features (multinomial logistic regression)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def fit_linear_head(features: np.ndarray, labels: np.ndarray, num_classes: int, l2: float = 1e-4,
                    iterations: int = 200, seed: int = 0) -> nn.Linear:
    """Softmax regression with an L2 penalty, solved full-batch with L-BFGS (deterministic for a seed)."""
    torch.manual_seed(seed)
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    head = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=iterations, history_size=20,
                                  line_search_fn="strong_wolfe")

    def loss_and_grad() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(loss_and_grad)
    return head.eval()


def accuracy(head: nn.Linear, features: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the head on features."""
    with torch.no_grad():
        predicted = head(torch.from_numpy(np.asarray(features, dtype=np.float32))).argmax(1).numpy()
    return float((predicted == np.asarray(labels)).mean())
