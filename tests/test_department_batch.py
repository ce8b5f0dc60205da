"""Each department fits the run's batch to its own size, and divides by the run's batch: a small
department neither holds the whole federation to tiny batches nor sends an update noisier than the others'."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from client.dp_training import train_private
from client.privacy import PrivacyLedger, PrivacyPlan, department_batch, poisson_schedule
from shared import protocol
from shared.data import Record, write_jsonl
from shared.params import get_trainable
from shared.partition import split_department
from tests.requests import fit, fit_request
from tests.test_department_client import LABELS, make_client

SIGMA, CLIP, PUBLIC_BATCH, LEARNING_RATE = 2.0, 1.0, 64, 1.0


@pytest.mark.parametrize(("records", "expected"), [(10_000, 64), (256, 64), (255, 63), (100, 25), (7, 1), (4, 1)])
def test_a_department_with_fewer_than_four_batches_samples_a_quarter_of_its_records(records, expected):
    batch = department_batch(num_records=records, batch_size=PUBLIC_BATCH)
    assert batch.expected == expected
    # a department sampling the run's batch divides by its own expected batch, as before; a smaller one by the run's
    assert batch.divisor == (None if expected == PUBLIC_BATCH else PUBLIC_BATCH)
    assert department_batch(num_records=records, batch_size=PUBLIC_BATCH, distributed=True).divisor == PUBLIC_BATCH
    rate, _ = poisson_schedule(num_records=records, batch_size=batch.expected, local_epochs=1)
    assert rate <= 0.25  # never a whole-department batch: Poisson sampling still amplifies


def noise_only_update(*, records: int) -> torch.Tensor:
    """A DP-SGD round on records whose gradients are all zero: the update is the noise alone."""
    head = nn.Linear(64, 40, bias=False)
    nn.init.zeros_(head.weight)
    dataset = TensorDataset(torch.zeros(records, 64), torch.zeros(records, dtype=torch.long))
    batch = department_batch(num_records=records, batch_size=PUBLIC_BATCH)
    rate, steps = poisson_schedule(num_records=records, batch_size=batch.expected, local_epochs=1)
    train_private(
        module=head, dataset=dataset, plan=PrivacyPlan(SIGMA, rate, steps, 20, 8.0, 8.0, 1e-5, "prv"), prior=[],
        batch_size=batch.expected, public_batch=batch.divisor, local_epochs=1, learning_rate=LEARNING_RATE, momentum=0.0,
        max_grad_norm=CLIP,
    )
    return head.weight.detach().clone() / steps ** 0.5  # steps independent draws: the noise of one step


@pytest.mark.parametrize("records", [40, 1024])
def test_every_departments_step_carries_the_noise_of_the_public_batch(records):
    """What this guards against: a department of 40 records sampling 10 a step and dividing by its own
    10 sends noise 6.4 times the others', and the federation's average with it. (1,024 records sample
    the run's batch of 64, sixteen times an epoch, and divide by their expected batch: 64 too.)"""
    per_step = noise_only_update(records=records)
    assert float(per_step.std()) == pytest.approx(LEARNING_RATE * SIGMA * CLIP / PUBLIC_BATCH, rel=0.1)


def test_a_department_smaller_than_the_runs_batch_trains_and_accounts_its_own_sampling_rate(tmp_path):
    client, config = make_client(tmp_path, batch_size=256)
    records = [Record(f"text {i}", LABELS[i % len(LABELS)]) for i in range(60)]
    write_jsonl(records, client.settings.data_path)
    _, _, metrics = fit(client, get_trainable(client.classifier), fit_request(config, 1))
    assert metrics[protocol.STATUS] == protocol.STATUS_TRAINED, metrics
    train = len(split_department(records, val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                                 seed=config.seed).train)
    assert train < config.batch_size  # the run's batch would not fit it once
    entry = PrivacyLedger(tmp_path / "state", department="finance").entries[-1]
    assert entry.sample_rate == poisson_schedule(num_records=train, batch_size=train // 4, local_epochs=1)[0] <= 0.25
    assert metrics[protocol.STEPS] == round(1 / entry.sample_rate)  # one local epoch of its own batches
