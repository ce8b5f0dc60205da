"""Stage 2's model: the top Transformer layers (with LoRA) and the head, fed cached lower-layer states.

With LoRA in the top k layers only (``lora-layers`` k), everything below them is the frozen public
backbone, a fixed function of one record: a department computes each record's hidden states at
the input of layer L - k once and caches them (no privacy cost, like the stage-1 features), and
DP-SGD then runs only the top k layers per step. Measured here (Opacus hooks, LoRA r=8, batch 32,
2 threads, MiniLM): top 1 layer ~6x and top 2 ~3x the samples/s of the full forward (issue 11).

    states (B, T, H) at the input of layer L - k, attention mask (B, T)
      -> the top k layers of the classifier's own encoder (shared modules: training them trains it)
      -> the classifier's pooling (the last two layers' mean-pooled states, averaged) -> its centring
      -> its head

``tests/test_top_layers.py`` checks that this forward equals the classifier's full forward and that
Opacus' per-sample gradients through it equal a per-example loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from shared.data import Record
from shared.features import tokenize
from shared.model import Backbone, TextClassifier, mean_pool

STATES_BATCH = 64


def _bert(encoder: Any) -> Any:
    """The Hugging Face encoder model inside a PEFT wrapper (or the model itself)."""
    return encoder.get_base_model() if hasattr(encoder, "get_base_model") else encoder


class CachedTopLayers(nn.Module):
    """``classifier``'s top ``count`` layers and head as one module: (states, mask) -> logits (B, L)."""

    def __init__(self, classifier: TextClassifier, *, count: int) -> None:
        super().__init__()
        self.bert = [_bert(classifier.encoder)]  # a list: not registered, the layers below are not trained
        self.layers = nn.ModuleList(list(self.bert[0].encoder.layer)[-count:])
        self.centering = classifier.centering  # no trained parameter: Opacus leaves it alone
        self.head = classifier.head

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        extended, _ = self.bert[0]._create_attention_masks(
            attention_mask=attention_mask, encoder_attention_mask=None, embedding_output=states,
            encoder_hidden_states=None, cache=None,
        )
        hidden, outputs = states, [states]
        for layer in self.layers:
            hidden = layer(hidden, extended)
            outputs.append(hidden)
        return self.head(self.centering(mean_pool(tuple(outputs), attention_mask)))


def top_layer_dataset(
    backbone: Backbone, records: Sequence[Record], *, labels: Sequence[str], max_length: int, count: int,
) -> TensorDataset:
    """``(states, attention_mask, labels)`` for DP-SGD on the top ``count`` layers."""
    label_index = {label: i for i, label in enumerate(labels)}
    input_ids, attention_mask = tokenize(backbone, [r.text for r in records], max_length=max_length)
    states = lower_layer_states(backbone, input_ids, attention_mask, count=count)
    return TensorDataset(states, attention_mask, torch.tensor([label_index[r.label] for r in records]))


@torch.no_grad()
def lower_layer_states(
    backbone: Backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, count: int,
) -> torch.Tensor:
    """Hidden states at the input of the top ``count`` layers, (N, T, H), from the frozen backbone."""
    states: list[torch.Tensor] = []
    for start in range(0, len(input_ids), STATES_BATCH):
        batch = slice(start, start + STATES_BATCH)
        out = backbone.model(input_ids=input_ids[batch], attention_mask=attention_mask[batch], output_hidden_states=True)
        states.append(out.hidden_states[-(count + 1)])
    return torch.cat(states)
