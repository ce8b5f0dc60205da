"""Feature centring: every feature is moved away from the federation's DP mean feature, then unit length.

Sentence embeddings share a large common direction: on CLINC150 the mean MiniLM feature has norm
0.52 against 1 for a single feature. In a class sum that common part grows with the (noisy,
weighted) number of records, not with what tells the classes apart, so under DP noise it turns
into a class-dependent bias, and it takes norm that the sensitivity bound would rather spend on
the part that tells classes apart. Moving each feature away from the mean and scaling it back to
unit length removes both: on CLINC150's validation split (stage 1 alone, 10 departments, three
``fedpriv simulate`` runs each; BENCHMARKS.md section 14), Dirichlet(0.5) 0.417 -> 0.565 at epsilon 1
and 0.821 -> 0.879 at epsilon 3.

The mean is no public constant: round 1 of a run (``centering-share`` > 0) is a DP release of
each department's feature sum and record count, [sum of x, n] (one record changes it by [x, 1],
L2 sensitivity sqrt(2)), summed under SecAgg+ like any release. The model keeps that sum as the
(H + 1,) parameter ``centering.statistics`` and derives the centre from it (post-processing):
centre = sum / n, scaled down to norm <= 1 when noise pushed it past (a mean of unit vectors has
norm <= 1), and no centre at all while n < 1 (before round 1, or a run without centring).

Whatever centre a (possibly hostile) server sends, a centred feature has norm <= 1, so the class
statistics' and DP-SGD's sensitivity bounds hold unchanged: the centre can cost accuracy, never
privacy.
"""

from __future__ import annotations

import torch
from torch import nn

CENTERING_PARAMETER = "centering.statistics"  # transmitted and checkpointed like the trained parameters


class FeatureCentering(nn.Module):
    """(B, H) unit features -> (B, H) features of norm <= 1, centred on ``statistics``' mean."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        # [feature sum (H), record count]: set by the server from round 1's release, never trained
        self.statistics = nn.Parameter(torch.zeros(hidden_size + 1), requires_grad=False)

    @property
    def centre(self) -> torch.Tensor:
        total, count = self.statistics[:-1], self.statistics[-1]
        if float(count) < 1:
            return torch.zeros_like(total)
        centre = total / count
        return centre / centre.norm().clamp(min=1.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return centred(features, self.centre)


def centred(features: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """(B, H) features moved away from ``centre`` and scaled to unit length; unchanged when there is
    no centre (all zeros). The exported model applies it with the centre it was saved with."""
    if not bool(centre.any()):
        return features
    return nn.functional.normalize(features - centre, dim=-1)
