"""Guard against opacus issue 820: Opacus per-sample gradients on a PEFT LoRA model must equal a
plain per-example loop, and DP-SGD must actually move the LoRA weights. These tests are why the
opacus/peft/transformers/torch versions are pinned in pyproject.toml."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from shared.features import tokenize
from shared.model import build_classifier

TEXTS = ["reset my password", "book a meeting room for six people tomorrow", "invoice 4411 status", "vpn"]


def _lora_model(backbone):
    torch.manual_seed(0)
    model = build_classifier(backbone, num_labels=3, lora_r=4, lora_alpha=8, lora_targets=("query", "value"))
    with torch.no_grad():  # LoRA B starts at zero, which would hide a wrong gradient for A
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        # features are centred (shared.centering): a mean of norm ~0.5 over 10 records
        model.centering.statistics.copy_(torch.cat([torch.randn(backbone.hidden_size) * 5 / backbone.hidden_size**0.5,
                                                    torch.tensor([10.0])]))
    return model


def trainable_names(model: nn.Module) -> list[str]:
    """The parameters DP-SGD trains (the centring's statistics are transmitted, never trained)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def test_opacus_per_sample_grads_match_per_example_loop(tiny_backbone):
    from opacus import GradSampleModule

    model = _lora_model(tiny_backbone)
    names = trainable_names(model)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names) and "head.weight" in names
    input_ids, mask = tokenize(tiny_backbone, TEXTS, max_length=16)
    labels = torch.tensor([0, 1, 2, 1])

    expected = {n: [] for n in names}
    params = dict(model.named_parameters())
    for i in range(len(TEXTS)):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(input_ids[i : i + 1], mask[i : i + 1]), labels[i : i + 1])
        loss.backward()
        for n in names:
            expected[n].append(params[n].grad.detach().clone())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(model, loss_reduction="sum")
    gsm.zero_grad()
    nn.functional.cross_entropy(gsm(input_ids, mask), labels, reduction="sum").backward()
    for n in names:
        per_sample = params[n].grad_sample
        assert per_sample is not None, f"Opacus computed no per-sample gradient for {n}"
        assert per_sample.shape == (len(TEXTS), *params[n].shape)
        torch.testing.assert_close(per_sample, torch.stack(expected[n]), rtol=1e-4, atol=1e-6, msg=n)
    gsm._close()


def test_dp_sgd_moves_lora_weights(tiny_backbone):
    from torch.utils.data import TensorDataset

    from client.dp_training import train_private
    from client.privacy import PrivacyPlan, poisson_schedule

    model = _lora_model(tiny_backbone)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    input_ids, mask = tokenize(tiny_backbone, TEXTS * 4, max_length=16)
    dataset = TensorDataset(input_ids, mask, torch.tensor([0, 1, 2, 1] * 4))
    q, steps = poisson_schedule(num_records=16, batch_size=4, local_epochs=1)
    plan = PrivacyPlan(1.0, q, steps, 1, 8.0, 8.0, 1e-5, "rdp")
    result = train_private(
        module=model, dataset=dataset, plan=plan, prior=[], batch_size=4, local_epochs=1,
        learning_rate=0.5, momentum=0.0, max_grad_norm=1.0,
    )
    assert result.steps == steps
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert (p.detach() - before[n]).abs().max() > 0, f"{n} did not change under DP-SGD"
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


@pytest.mark.parametrize("head_only", [False, True])
def test_dp_step_equals_the_clipped_per_example_mean(tiny_backbone, head_only):
    """The step train_private takes (noise 0) is -lr * mean of per-example clipped gradients:
    hooks mode for the LoRA model, ghost clipping for the head on cached features."""
    from torch.utils.data import TensorDataset

    from client.dp_training import train_private
    from client.privacy import PrivacyPlan, poisson_schedule
    from shared.features import embed_texts

    full = _lora_model(tiny_backbone)
    texts = TEXTS * 2
    input_ids, mask = tokenize(tiny_backbone, texts, max_length=16)
    labels = torch.tensor([0, 1, 2, 1, 2, 0, 1, 0])
    if head_only:
        model, inputs = full.feature_head(), (embed_texts(tiny_backbone, texts, max_length=16),)
    else:
        model, inputs = full, (input_ids, mask)
    names = trainable_names(model)
    params = dict(model.named_parameters())
    clip = 0.05
    clipped_sum = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(len(texts)):
        model.zero_grad()
        nn.functional.cross_entropy(model(*(x[i : i + 1] for x in inputs)), labels[i : i + 1]).backward()
        norm = torch.sqrt(sum(params[n].grad.pow(2).sum() for n in names))
        assert norm > clip  # the bound is active for every example
        for n in names:
            clipped_sum[n] += params[n].grad * min(1.0, clip / float(norm))
    before = {n: params[n].detach().clone() for n in names}

    q, steps = poisson_schedule(num_records=len(texts), batch_size=len(texts), local_epochs=1)
    assert (q, steps) == (1.0, 1)  # q = 1: every record is in the single batch, deterministically
    train_private(
        module=model, dataset=TensorDataset(*inputs, labels), plan=PrivacyPlan(0.0, q, steps, 1, 8.0, 8.0, 1e-5, "rdp"),
        prior=[], batch_size=len(texts), local_epochs=1, learning_rate=1.0, momentum=0.0, max_grad_norm=clip,
    )
    for n in names:
        torch.testing.assert_close(before[n] - params[n].detach(), clipped_sum[n] / len(texts), rtol=1e-3, atol=1e-6)


def test_empty_poisson_batches_still_take_their_step():
    from torch.utils.data import TensorDataset

    from client.dp_training import train_private
    from client.privacy import PrivacyPlan, poisson_schedule

    head = nn.Linear(4, 3)
    q, steps = poisson_schedule(num_records=20, batch_size=1, local_epochs=1)  # P(some empty batch) > 0.9999
    result = train_private(
        module=head, dataset=TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,))),
        plan=PrivacyPlan(1.0, q, steps, 1, 8.0, 8.0, 1e-5, "rdp"), prior=[(1.0, q, 5)], batch_size=1, local_epochs=1,
        learning_rate=0.1, momentum=0.0, max_grad_norm=1.0,
    )
    assert result.steps == 20  # and Opacus counted all 20 on top of the prior history, or train_private raises


def test_empty_poisson_batches_of_the_lora_model_take_a_noise_only_step(tiny_backbone):
    """A Transformer cannot run zero sequences; the step (noise only) must still be taken and counted."""
    from torch.utils.data import TensorDataset

    from client.dp_training import train_private
    from client.privacy import PrivacyPlan, poisson_schedule

    model = _lora_model(tiny_backbone)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    input_ids, mask = tokenize(tiny_backbone, TEXTS * 5, max_length=16)
    q, steps = poisson_schedule(num_records=20, batch_size=1, local_epochs=1)  # P(some empty batch) > 0.9999
    result = train_private(
        module=model, dataset=TensorDataset(input_ids, mask, torch.tensor([0, 1, 2, 1] * 5)),
        plan=PrivacyPlan(1.0, q, steps, 1, 8.0, 8.0, 1e-5, "rdp"), prior=[], batch_size=1, local_epochs=1,
        learning_rate=0.1, momentum=0.0, max_grad_norm=1.0,
    )
    assert result.steps == 20
    assert all((p.detach() - before[n]).abs().max() > 0 for n, p in model.named_parameters() if p.requires_grad)
