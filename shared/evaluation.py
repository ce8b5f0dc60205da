"""Loss and accuracy of a trained module on a labelled tensor data set (departments and server)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


@torch.no_grad()
def evaluate_module(module: torch.nn.Module, dataset: TensorDataset, batch_size: int = 512) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``module`` on a ``(*inputs, labels)`` dataset."""
    module.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        *inputs, labels = dataset[start : start + batch_size]
        logits = module(*inputs)
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(dim=-1) == labels).sum())
    n = max(len(dataset), 1)
    return loss_sum / n, correct / n


@torch.no_grad()
def per_example_losses(module: torch.nn.Module, dataset: TensorDataset, batch_size: int = 512) -> torch.Tensor:
    """Cross-entropy of every example, in order: what a membership-inference attacker observes."""
    module.eval()
    losses = []
    for start in range(0, len(dataset), batch_size):
        *inputs, labels = dataset[start : start + batch_size]
        losses.append(torch.nn.functional.cross_entropy(module(*inputs), labels, reduction="none"))
    return torch.cat(losses) if losses else torch.empty(0)
