"""A department's declared label scope: parsing, the scoped head, DP steps on it, and a real client round."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from client.department import DepartmentClient
from client.department_data import resolve_department
from client.dp_training import train_private
from client.label_scope import ScopedHead, parse_label_scope, scoped_head
from client.privacy import PrivacyPlan
from shared import protocol
from shared.config import RunConfig
from shared.data import Record, write_jsonl
from shared.errors import ConfigError
from shared.model import trainable_names
from shared.params import get_trainable
from tests.requests import failure, fit, fit_request

LABELS = ("expense", "password", "room", "vpn")


def test_scope_is_parsed_from_a_list_or_a_comma_separated_string():
    assert parse_label_scope(["room", "vpn"], department="it", labels=LABELS) == ("room", "vpn")
    assert parse_label_scope(" room, vpn ,room", department="it", labels=LABELS) == ("room", "vpn")
    assert parse_label_scope(None, department="it", labels=LABELS) is None
    assert parse_label_scope("", department="it", labels=LABELS) is None


@pytest.mark.parametrize("value, named", [
    ("room,printer", "'printer' not among the federation's labels"),
    (",", "names no label"),
    (3, "expected a list of labels"),
])
def test_bad_scopes_are_refused_naming_the_department_and_value(value, named):
    with pytest.raises(ConfigError, match="department it") as info:
        parse_label_scope(value, department="it", labels=LABELS)
    assert named in str(info.value)


def test_scoped_head_computes_the_full_logits_and_trains_only_its_rows():
    torch.manual_seed(0)
    head = nn.Linear(6, 4)
    features = torch.randn(5, 6)
    expected = head(features).detach()
    before = head.weight.detach().clone()
    owner = nn.Module()
    owner.head = head
    with scoped_head(owner, [1, 3]) as scoped:
        assert owner.head is scoped
        torch.testing.assert_close(scoped(features), expected)
        nn.functional.cross_entropy(scoped(features), torch.tensor([1, 3, 1, 3, 1])).backward()
        assert [n for n, p in scoped.named_parameters()] == ["own.weight", "own.bias"]
        with torch.no_grad():
            scoped.own.weight -= scoped.own.weight.grad
    assert owner.head is head
    changed = (head.weight.detach() - before).abs().sum(dim=1) > 0
    assert changed.tolist() == [False, True, False, True]


def test_dp_step_on_a_scoped_head_equals_the_clipped_per_example_mean():
    """Ghost clipping on the scoped rows: the step (noise 0) is -lr * mean of per-example clipped gradients."""
    torch.manual_seed(0)
    scoped = ScopedHead(nn.Linear(6, 5), [1, 3])
    features, labels = torch.randn(8, 6) * 3, torch.tensor([1, 3, 1, 3, 3, 1, 1, 3])
    params = dict(scoped.named_parameters())
    clip = 0.05
    clipped_sum = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(labels)):
        scoped.zero_grad()
        nn.functional.cross_entropy(scoped(features[i : i + 1]), labels[i : i + 1]).backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params.values()))
        assert norm > clip
        for n, p in params.items():
            clipped_sum[n] += p.grad * min(1.0, clip / float(norm))
    before = {n: p.detach().clone() for n, p in params.items()}
    train_private(module=scoped, dataset=TensorDataset(features, labels), plan=PrivacyPlan(0.0, 1.0, 1, 1, 8.0, 8.0, 1e-5, "rdp"),
                  prior=[], batch_size=8, local_epochs=1, learning_rate=1.0, momentum=0.0, max_grad_norm=clip)
    for n, p in params.items():
        torch.testing.assert_close(before[n] - p.detach(), clipped_sum[n] / len(labels), rtol=1e-3, atol=1e-6)


def _client(tmp_path, *, scope: str, labels_in_data: tuple[str, ...], lora_r: int = 0) -> tuple[DepartmentClient, RunConfig]:
    records = [Record(f"{label} request number {i}", label) for label in labels_in_data for i in range(24)]
    data = tmp_path / "it.jsonl"
    write_jsonl(records, data)
    config = RunConfig(model="tiny", labels=LABELS, batch_size=16, learning_rate=0.5, num_server_rounds=3,
                       lora_r=lora_r, lora_alpha=8, target_epsilon=8.0, target_delta=1e-4, out_dir=str(tmp_path / "out"))
    settings = resolve_department(config, {"department": "it", "data-path": str(data), "state-dir": str(tmp_path / "state"),
                                           "label-scope": scope})
    return DepartmentClient(config=config, settings=settings, run_id=1), config


@pytest.mark.parametrize("lora_r", [0, 4])
def test_a_scoped_department_sends_a_zero_update_outside_its_rows(tmp_path, lora_r):
    client, config = _client(tmp_path, scope="room,vpn", labels_in_data=("room", "vpn"), lora_r=lora_r)
    parameters = get_trainable(client.classifier)
    delta, num_examples, metrics = fit(client, parameters, fit_request(config, 1))
    assert metrics[protocol.STATUS] == protocol.STATUS_TRAINED and num_examples > 0
    by_name = dict(zip(trainable_names(client.classifier), delta, strict=True))
    assert not by_name["centering.statistics"].any()  # DP-SGD never moves the centring
    own = [LABELS.index("room"), LABELS.index("vpn")]
    other = [LABELS.index("expense"), LABELS.index("password")]
    for name in ("head.weight", "head.bias"):
        assert np.all(by_name[name][other] == 0), f"{name}: rows outside the scope moved"
        assert np.abs(by_name[name][own]).sum() > 0, f"{name}: the scope's rows did not move"
    if lora_r:
        assert any(np.abs(d).sum() > 0 for n, d in by_name.items() if "lora" in n)
    assert type(client.classifier.head) is nn.Linear  # the shared classifier got its plain head back


def test_a_record_outside_the_declared_scope_is_refused_with_its_line(tmp_path):
    client, config = _client(tmp_path, scope="room", labels_in_data=("room", "vpn"))
    reason, log = failure(client, fit(client, get_trainable(client.classifier), fit_request(config, 1)))
    assert re.search(r"it\.jsonl:\d+: unknown label 'vpn' \(not in department it's label-scope\)", log)
    assert "vpn" not in reason  # the label, a record's content, stays in the department's own log
