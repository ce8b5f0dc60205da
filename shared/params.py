"""Moving the trainable parameters (LoRA adapters + head) in and out of a model as NumPy arrays.

The order is the model's ``named_parameters`` order restricted to trainable ones; the frozen
backbone is never read or written here, so it never travels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from shared.errors import ModelError
from shared.model import trainable_names


def get_trainable(model: nn.Module) -> list[np.ndarray]:
    params = dict(model.named_parameters())
    return [params[name].detach().cpu().numpy().copy() for name in trainable_names(model)]


def set_trainable(model: nn.Module, arrays: Sequence[np.ndarray], *, sender: str = "server") -> None:
    """Load arrays into the trainable parameters; reject a wrong count, shape or non-finite value."""
    names = trainable_names(model)
    params = dict(model.named_parameters())
    if len(arrays) != len(names):
        raise ModelError(f"{sender} sent {len(arrays)} arrays, the model has {len(names)} trainable tensors")
    problems = []
    for name, array in zip(names, arrays, strict=True):
        expected = tuple(params[name].shape)
        if tuple(array.shape) != expected:
            problems.append(f"{name}: shape {tuple(array.shape)}, expected {expected}")
        elif not np.all(np.isfinite(array)):
            problems.append(f"{name}: contains NaN or infinite values")
    if problems:
        raise ModelError(f"{sender} sent unusable parameters: " + "; ".join(problems))
    with torch.no_grad():
        for name, array in zip(names, arrays, strict=True):
            params[name].copy_(torch.from_numpy(np.asarray(array, dtype=np.float32)))
