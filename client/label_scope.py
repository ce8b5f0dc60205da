"""A department's label scope: the labels it declares it can hold, and the only head rows it trains.

Under per-department DP-SGD every trained coordinate receives that department's noise. When the
departments hold different labels (finance's intents are not HR's), a department's records carry
signal only for the head rows of its own labels, yet an unscoped update adds noise to all of
them, and the federation's average then buries each row's signal under every department's noise.
A department that declares a scope trains only its own rows: the softmax still runs over every
label (the other rows' logits enter as constants, so its records still learn to beat them), but
gradients, clipping and noise touch only its rows, and the update is exactly zero elsewhere.

The scope is declared configuration (``label-scope`` in the department's own settings), never
read off the records: which labels a department's records carry is itself private, since one
record can be the only one with its label. A record outside the declared scope is refused.
On CLINC150 by domain, in-scope test accuracy at epsilon 8 went from 0.889 to 0.921 (README).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from shared.errors import ConfigError

SCOPE_KEY = "label-scope"


def parse_label_scope(value: Any, *, department: str, labels: Sequence[str]) -> tuple[str, ...] | None:
    """``label-scope`` from a department's settings (a list, or one comma-separated string); None: all labels."""
    if value is None or value == "":
        return None
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if items is None:
        raise ConfigError(f"{SCOPE_KEY}: expected a list of labels or 'a,b,c', got {value!r}",
                          source=f"settings of department {department}")
    scope = tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
    problems = []
    if not scope:
        problems.append(f"{SCOPE_KEY}: names no label")
    unknown = [label for label in scope if labels and label not in labels]
    if unknown:
        problems.append(f"{SCOPE_KEY}: {', '.join(map(repr, unknown))} not among the federation's labels")
    if problems:
        raise ConfigError(problems, source=f"settings of department {department}")
    return scope


class ScopedHead(nn.Module):
    """``head`` with only the rows ``rows`` trainable; the other rows' logits are constants.

    (B, H) -> (B, L): the full head's logits, in which the scoped rows come from ``own``,
    a ``Linear(H, len(rows))`` that Opacus clips and noises like any other Linear.
    """

    rows: torch.Tensor
    frozen_weight: torch.Tensor
    frozen_bias: torch.Tensor

    def __init__(self, head: nn.Linear, rows: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("rows", torch.as_tensor(list(rows), dtype=torch.long))
        self.register_buffer("frozen_weight", head.weight.detach().clone())
        self.register_buffer("frozen_bias", head.bias.detach().clone())
        self.own = nn.Linear(head.in_features, len(rows))
        with torch.no_grad():
            self.own.weight.copy_(head.weight[self.rows])
            self.own.bias.copy_(head.bias[self.rows])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        frozen = features @ self.frozen_weight.T + self.frozen_bias
        return frozen.index_copy(1, self.rows, self.own(features))

    @torch.no_grad()
    def write_back(self, head: nn.Linear) -> None:
        head.weight[self.rows] = self.own.weight
        head.bias[self.rows] = self.own.bias


@contextmanager
def scoped_head(owner: Any, rows: Sequence[int]) -> Iterator[ScopedHead]:
    """Swap ``owner.head`` for a ``ScopedHead`` while training; write the trained rows back after."""
    head = owner.head
    scoped = ScopedHead(head, rows)
    owner.head = scoped
    try:
        yield scoped
    finally:
        owner.head = head
    scoped.write_back(head)
