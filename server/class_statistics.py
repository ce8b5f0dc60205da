"""Stage 1 on the server: from the sum of the departments' class statistics to a nearest-class-mean head.

The departments' releases (``client.class_statistics``) arrive as SecAgg+'s weighted average of
vectors shaped like the head, each scaled down by the public ``statistics_scale`` and weighted
alike, so the federation's per-class feature sums are that average times the number of
departments times the scale: the server never sees one department's release. Sums add, so the
head built from them is the one a single party holding every record would build (without DP,
exactly; ``tests/test_class_statistics.py``).

The head is a cosine nearest-class-mean classifier: row c is ``logit_scale`` times the unit
direction of class c's feature sum, the bias is zero, and features are unit vectors, so the
logits are ``logit_scale`` times the cosine to each class mean direction. A class that no
department released keeps a zero row (it is never predicted over a released one).
"""

from __future__ import annotations

import numpy as np


def federation_sums(average: list[np.ndarray], *, departments: int, scale: float) -> list[np.ndarray]:
    """Undo SecAgg+'s averaging and the departments' scaling: the sums of every release."""
    return [np.asarray(a, dtype=np.float64) * departments * scale for a in average]


def nearest_class_mean_head(sums: np.ndarray, *, logit_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(L, H) class feature sums -> the head's (weight (L, H), bias (L,))."""
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    directions = np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0)
    return (logit_scale * directions).astype(np.float32), np.zeros(sums.shape[0], dtype=np.float32)
