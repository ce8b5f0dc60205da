"""SecAgg+ when a department drops out at any stage: fedpriv's server workflow against departments
that run Flower's own ``secaggplus_mod``, in one process, with a grid that loses one department's
replies from a chosen stage on (a host that dies, a link that goes down).

Flower 1.42's workflow lists a department that dropped before sharing its keys as "dead" in the
unmask stage; the survivors hold no share of its key and fail (``KeyError`` in ``_unmask``), and
the round is lost. This was found by killing a department's host in a network-namespace
deployment (tests/test_network_namespaces.py); ``server.secure_aggregation`` corrects it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, ConfigRecord, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.supercore.task_identity import TaskIdentity

from server.secure_aggregation import AuditedSecAggPlusWorkflow
from shared.config import RunConfig

DEPARTMENTS = 4
SHAPE = (3, 5)


@pytest.fixture(autouse=True)
def server_task(monkeypatch):
    """Messages take their run and sender from the process's task identity (the ServerApp's, here)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class Department(ClientProxy):
    """A sampled department as the strategy sees it; the grid below delivers its messages."""

    def get_properties(self, *args, **kwargs):  # the legacy proxy API: never called by the workflow
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


class LossyGrid:
    """Delivers each message to its department's ``secaggplus_mod``; ``dropped`` never answers from
    ``from_stage`` on (its earlier stages ran normally)."""

    def __init__(self, updates: dict[int, np.ndarray], *, dropped: int | None, from_stage: str | None) -> None:
        self.updates, self.dropped, self.from_stage = updates, dropped, from_stage
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in updates}
        self.lost = False

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for sent in messages:
            message = copy.deepcopy(sent)  # as over the wire: the mod consumes the message it gets
            node = message.metadata.dst_node_id
            stage = message.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            if node == self.dropped and (self.lost or stage == self.from_stage):
                self.lost = True
                continue

            def train(msg: Message, ctxt: Context, node: int = node) -> Message:
                fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([self.updates[node]]), weight(node), {})
                return Message(compat.fitres_to_recorddict(fit, keep_input=True), reply_to=msg)

            replies.append(secaggplus_mod(message, self.contexts[node], train))
        return replies


def secure_round(workflow: SecAggPlusWorkflow, grid: LossyGrid) -> np.ndarray | None:
    """One SecAgg+ fit round; the aggregate the strategy received, or None when the round halted."""
    manager = SimpleClientManager()
    for node in grid.updates:
        department = Department(str(node))
        department.node_id = node
        manager.register(department)
    strategy = FedAvg(fraction_fit=1.0, min_fit_clients=DEPARTMENTS, min_available_clients=DEPARTMENTS)
    context = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros(SHAPE, dtype=np.float32)]), keep_input=True)
    workflow(grid, context)
    model = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
        context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))[0]
    return model if np.any(model != 0) else None  # a halted round leaves the zeros it started from


def weight(node: int) -> int:
    return node - 100  # a department's record count, within the workflow's max weight


def updates() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {node: rng.uniform(-1, 1, SHAPE).astype(np.float32) for node in range(101, 101 + DEPARTMENTS)}


def fedpriv_workflow() -> AuditedSecAggPlusWorkflow:
    return AuditedSecAggPlusWorkflow(config=RunConfig(model="tiny", labels=("a", "b"), secagg_max_weight=100),
                                     audit_dir=None)


@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK])
def test_a_department_that_drops_at_any_stage_leaves_the_survivors_sum(stage):
    given = updates()
    dropped = 102
    aggregate = secure_round(fedpriv_workflow(), LossyGrid(given, dropped=dropped, from_stage=stage))
    # Until its masked vector is in, the dropped department is not in the sum; after (unmask), it is.
    included = [n for n in given if n != dropped or stage == Stage.UNMASK]
    weights = np.array([weight(n) for n in included], dtype=np.float64)
    expected = sum(w * given[n] for w, n in zip(weights, included, strict=True)) / weights.sum()
    assert aggregate is not None, f"the round halted when a department dropped at {stage}"
    np.testing.assert_allclose(aggregate, expected, atol=1e-3)


def test_flowers_own_workflow_loses_the_round_when_a_department_drops_before_sharing_keys():
    """The defect the correction is for: with Flower 1.42's workflow the survivors fail in unmask."""
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.6, max_weight=100)
    with pytest.raises(KeyError):
        secure_round(workflow, LossyGrid(updates(), dropped=102, from_stage=Stage.SETUP))
