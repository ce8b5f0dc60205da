"""Distributed noise in DP-SGD rounds: one step a round, a 1/sqrt(shares) share of the noise, a public divisor,
so that the SecAgg+ sum of ``shares`` departments' updates carries the plan's whole noise (stage 1's release:
tests/test_class_statistics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from client.department import DepartmentClient
from client.department_data import resolve_department
from client.dp_training import train_private
from client.prepared_data import prepare, shared_classifier
from client.privacy import MECHANISM_DP_SGD, PrivacyLedger, PrivacyPlan, department_batch, poisson_schedule
from shared import protocol
from shared.accounting import epsilon_of
from shared.config import RunConfig
from shared.data import Record, write_jsonl
from shared.model import build_classifier, trainable_names
from shared.params import get_trainable
from shared.top_layers import CachedTopLayers
from tests.requests import fit, fit_request
from tests.test_department_client import LABELS, TEXTS, department_file

SIGMA, CLIP, BATCH, LEARNING_RATE = 2.0, 1.0, 10, 1.0


def noise_only_step(*, shares: int, records: int = 40) -> tuple[torch.Tensor, int]:
    """One distributed round on records whose gradients are all zero: the step is -lr x noise / BATCH."""
    head = nn.Linear(64, 50, bias=False)
    nn.init.zeros_(head.weight)
    dataset = TensorDataset(torch.zeros(records, 64), torch.zeros(records, dtype=torch.long))
    rate, _ = poisson_schedule(num_records=records, batch_size=BATCH, local_epochs=1)
    result = train_private(
        module=head, dataset=dataset, plan=PrivacyPlan(SIGMA, rate, 1, 20, 8.0, 8.0, 1e-5, "prv"), prior=[],
        batch_size=BATCH, local_epochs=3, learning_rate=LEARNING_RATE, momentum=0.9, max_grad_norm=CLIP,
        public_batch=BATCH, noise_shares=shares,
    )
    return head.weight.detach().clone(), result.steps


def test_a_distributed_round_is_one_step_with_a_share_of_the_noise_over_the_public_batch():
    step, steps = noise_only_step(shares=4)
    assert steps == 1  # whatever local-epochs says: the plan counts one step a round
    whole = LEARNING_RATE * SIGMA * CLIP / BATCH
    assert float(step.std()) == pytest.approx(whole / math.sqrt(4), rel=0.1)  # 3,200 draws: 2.5% standard error


def test_the_sum_of_the_shares_carries_the_plans_whole_noise():
    """The attack this guards against: a share smaller than 1/sqrt(shares) (or a divisor that differs
    between departments) leaves the SecAgg+ sum with less noise than the ledger's epsilon is computed for."""
    total = sum(noise_only_step(shares=4)[0] for _ in range(4))
    sensitivity = LEARNING_RATE * CLIP / BATCH  # the most one record moves the sum
    assert float(total.std()) / sensitivity == pytest.approx(SIGMA, rel=0.1)


def distributed_department(tmp_path, *, data=None, lora: dict | None = None, **node_settings) -> tuple[DepartmentClient, RunConfig]:
    shared_classifier.cache_clear()
    prepare.cache_clear()
    config = RunConfig(model="tiny", labels=LABELS, batch_size=16, target_delta=1e-4, secagg_max_weight=200,
                       out_dir=str(tmp_path / "out"), target_epsilon=3.0, num_server_rounds=4, distributed_noise=True,
                       **(lora or {}))
    node = {"department": "finance", "data-path": str(data or department_file(tmp_path)), "state-dir": str(tmp_path / "state")}
    client = DepartmentClient(config=config, settings=resolve_department(config, node | node_settings), run_id=7)
    return client, config


def dp_sgd_request(config: RunConfig, server_round: int) -> dict:
    return fit_request(config, server_round, stage=protocol.STAGE_DP_SGD) | {protocol.AGGREGATE_SIZE: 4}


@pytest.mark.parametrize("lora", [None, {"lora_r": 4, "lora_layers": 1}], ids=["head", "lora-top-layer"])
def test_a_consenting_departments_dp_sgd_round_records_one_step_and_both_epsilons(tmp_path, lora):
    scope = ("expense", "password")
    write_jsonl([Record(f"{t} {i}", label) for label in scope for t in TEXTS[label] for i in range(12)],
                tmp_path / "finance.jsonl")
    client, config = distributed_department(tmp_path, data=tmp_path / "finance.jsonl", lora=lora, **{
        "distributed-noise": "true", "min-departments": 4, "label-scope": ",".join(scope)})
    start = get_trainable(client.classifier)
    arrays, _, metrics = fit(client, start, dp_sgd_request(config, 3))
    assert metrics[protocol.STATUS] == protocol.STATUS_TRAINED and metrics[protocol.STEPS] == 1
    entry = PrivacyLedger(tmp_path / "state", department="finance").entries[-1]
    assert (entry.mechanism, entry.steps, entry.noise_shares) == (MECHANISM_DP_SGD, 1, 4)
    own = epsilon_of([(entry.noise_multiplier / 2, entry.sample_rate, 1)], delta=1e-4, accountant="prv")
    assert entry.own_epsilon == pytest.approx(own) and own > entry.epsilon
    # a declared scope does not narrow the noise: the rows of labels outside it move too
    trained = dict(zip(trainable_names(client.classifier), arrays, strict=True))
    outside = [LABELS.index(label) for label in LABELS if label not in scope]
    assert np.all(trained["head.weight"][outside] != 0) and np.all(trained["head.bias"][outside] != 0)
    if lora:  # the adapters moved, with their share of the noise too
        assert any(np.any(trained[name] != start[i]) for i, name in enumerate(trainable_names(client.classifier))
                   if "lora_" in name)


def test_dp_sgd_with_distributed_noise_needs_the_departments_consent(tmp_path):
    client, config = distributed_department(tmp_path)
    _, weight, metrics = fit(client, get_trainable(client.classifier), dp_sgd_request(config, 3))
    assert metrics[protocol.STATUS] == protocol.STATUS_POLICY_REFUSED and weight == 0
    assert "has not consented" in metrics[protocol.REASON]
    assert not (tmp_path / "state" / "privacy-ledger.jsonl").exists()  # nothing spent


@pytest.mark.parametrize("count", [1, 2])
def test_lora_in_the_top_layers_gets_the_same_share_of_the_noise(tiny_backbone, count):
    """Every trained-module shape (opacus issue 820): the LoRA adapters that hooks mode trains get the
    share too. With the head at zero no gradient reaches them, so their one-step move is the noise alone."""
    torch.manual_seed(0)
    classifier = build_classifier(tiny_backbone, num_labels=3, lora_r=16, lora_alpha=16,
                                  lora_targets=("query", "value"), lora_layers=count)
    nn.init.zeros_(classifier.head.weight)
    model = CachedTopLayers(classifier, count=count)
    records, tokens = 40, 6
    dataset = TensorDataset(torch.randn(records, tokens, tiny_backbone.hidden_size), torch.ones(records, tokens, dtype=torch.long),
                            torch.zeros(records, dtype=torch.long))
    lora = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
    rate, _ = poisson_schedule(num_records=records, batch_size=BATCH, local_epochs=1)
    result = train_private(
        module=model, dataset=dataset, plan=PrivacyPlan(SIGMA, rate, 1, 20, 8.0, 8.0, 1e-5, "prv"), prior=[],
        batch_size=BATCH, local_epochs=3, learning_rate=LEARNING_RATE, momentum=0.9, max_grad_norm=CLIP,
        public_batch=BATCH, noise_shares=4,
    )
    assert result.steps == 1
    moved = torch.cat([(p.detach() - lora[name]).flatten() for name, p in model.named_parameters() if name in lora])
    assert moved.numel() >= 2000  # draws enough for a 10% tolerance
    whole = LEARNING_RATE * SIGMA * CLIP / BATCH
    assert float(moved.std()) == pytest.approx(whole / math.sqrt(4), rel=0.1)


def test_departments_of_different_sizes_add_shares_of_one_noise_multiplier(tmp_path):
    """The attack this guards against: calibrated at its own sampling rate, a department with more records
    adds a smaller multiplier, and the SecAgg+ sum then carries less noise than a smaller department's
    ledger assumes (on the epsilon-8 default: epsilon 8.92 where the ledger said 7.99)."""
    plans = {}
    for records in (200, 2_000, 20_000):  # sampling rates 1/4, 1/8, 1/79 at batch 256 (a quarter of 200: 50)
        ledger = PrivacyLedger(tmp_path / str(records), department=f"d{records}")
        batch = department_batch(num_records=records, batch_size=256, distributed=True)
        plans[records] = ledger.plan(run="r", num_records=records, batch_size=batch.expected, local_epochs=1,
                                     planned_rounds=20, run_epsilon=4.0, budget=4.0, delta=1e-5, accountant="prv",
                                     one_step_rounds=True)
    sigmas = {plan.noise_multiplier for plan in plans.values()}
    assert len(sigmas) == 1  # one multiplier: every sum of their shares carries it
    for plan in plans.values():  # each accounts its own sampling rate: within its budget, the smallest at it
        assert epsilon_of([plan.round_mechanism] * plan.planned_rounds, delta=1e-5, accountant="prv") <= 4.0 + 0.01
    assert epsilon_of([plans[200].round_mechanism] * 20, delta=1e-5, accountant="prv") == pytest.approx(4.0, abs=0.01)
    assert len({plan.sample_rate for plan in plans.values()}) == 3
