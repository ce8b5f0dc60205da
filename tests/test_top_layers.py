"""Stage 2's cached-state model: the same function as the full classifier, and exact per-sample gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from client.dp_training import train_private
from client.privacy import PrivacyPlan, poisson_schedule
from shared.features import tokenize
from shared.model import build_classifier, trainable_names
from shared.top_layers import CachedTopLayers, lower_layer_states

TEXTS = ["reset my password", "book the boardroom for friday", "file my taxi expenses please",
         "vpn keeps dropping", "my badge does not open the door", "payroll is late this month",
         "order new toner", "room for six at noon"]


def top_layer_model(backbone, count):
    torch.manual_seed(0)
    classifier = build_classifier(backbone, num_labels=3, lora_r=4, lora_alpha=8, lora_targets=("query", "value"),
                                  lora_layers=count)
    with torch.no_grad():
        for name, parameter in classifier.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # PEFT starts B at zero: make the adapters matter
        # features are centred (shared.centering): a mean of norm ~0.5 over 10 records
        classifier.centering.statistics.copy_(torch.cat([torch.randn(backbone.hidden_size) * 5 / backbone.hidden_size**0.5,
                                                         torch.tensor([10.0])]))
    return classifier


@pytest.mark.parametrize("count", [1, 2])
def test_lora_sits_in_the_top_layers_only_and_the_cached_forward_equals_the_full_one(tiny_backbone, count):
    classifier = top_layer_model(tiny_backbone, count)
    depth = tiny_backbone.model.config.num_hidden_layers
    lora = [n for n in trainable_names(classifier) if "lora" in n]
    assert float(classifier.centering.statistics[-1]) == 10.0  # the centring is part of both forwards
    assert lora and all(any(f"layer.{i}." in n for i in range(depth - count, depth)) for n in lora)
    input_ids, mask = tokenize(tiny_backbone, TEXTS, max_length=16)
    states = lower_layer_states(tiny_backbone, input_ids, mask, count=count)
    classifier.eval()
    with torch.no_grad():
        torch.testing.assert_close(CachedTopLayers(classifier, count=count)(states, mask),
                                   classifier(input_ids, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("count", [1, 2])
def test_opacus_step_on_cached_states_equals_the_per_example_clipped_mean(tiny_backbone, count):
    classifier = top_layer_model(tiny_backbone, count)
    model = CachedTopLayers(classifier, count=count)
    input_ids, mask = tokenize(tiny_backbone, TEXTS, max_length=16)
    states = lower_layer_states(tiny_backbone, input_ids, mask, count=count)
    labels = torch.tensor([0, 1, 2, 1, 2, 0, 1, 0])
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    assert any("lora_A" in n for n in names) and "head.weight" in names
    clip = 0.05
    clipped_sum = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(len(TEXTS)):
        model.zero_grad()
        nn.functional.cross_entropy(model(states[i : i + 1], mask[i : i + 1]), labels[i : i + 1]).backward()
        norm = torch.sqrt(sum(params[n].grad.pow(2).sum() for n in names))
        assert norm > clip
        for n in names:
            clipped_sum[n] += params[n].grad * min(1.0, clip / float(norm))
    before = {n: params[n].detach().clone() for n in names}
    q, steps = poisson_schedule(num_records=len(TEXTS), batch_size=len(TEXTS), local_epochs=1)
    train_private(
        module=model, dataset=TensorDataset(states, mask, labels), plan=PrivacyPlan(0.0, q, steps, 1, 8.0, 8.0, 1e-5, "rdp"),
        prior=[], batch_size=len(TEXTS), local_epochs=1, learning_rate=1.0, momentum=0.0, max_grad_norm=clip,
    )
    for n in names:
        torch.testing.assert_close(before[n] - params[n].detach(), clipped_sum[n] / len(TEXTS), rtol=1e-3, atol=1e-6)
    # the classifier itself was trained: the view shares its modules
    assert all(torch.equal(dict(classifier.named_parameters())[f"head.{k}"], params[f"head.{k}"]) for k in ("weight", "bias"))
