"""SecAgg+ when a department drops out at any stage: fedpriv's server workflow against departments
that run Flower's own ``secaggplus_mod``, in one process, with a grid that loses one department's
replies from a chosen stage on (a host that dies, a link that goes down).

Flower 1.42's workflow lists a department that dropped before sharing its keys as "dead" in the
unmask stage; the survivors hold no share of its key and fail (``KeyError`` in ``_unmask``), and
the round is lost. This was found by killing a department's host in a network-namespace
deployment (tests/test_network_namespaces.py); ``server.secure_aggregation`` corrects it."""

from __future__ import annotations

import copy
from collections.abc import Callable

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
from flwr.server.strategy import FedAvg, Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from server.secure_aggregation import AuditedSecAggPlusWorkflow
from shared import protocol
from shared.config import RunConfig

DEPARTMENTS = 4
SHAPE = (3, 5)


pytestmark = pytest.mark.usefixtures("server_task")


class Department(ClientProxy):
    """A sampled department as the strategy sees it; the grid below delivers its messages."""

    def get_properties(self, *args, **kwargs):  # the legacy proxy API: never called by the workflow
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


class LossyGrid:
    """Delivers each message to its department's ``secaggplus_mod``; the ``dropped`` department(s)
    never answer from ``from_stage`` on (their earlier stages ran normally)."""

    def __init__(self, updates: dict[int, np.ndarray], *, dropped: int | set[int] | None, from_stage: str | None,
                 to_update: Callable[[np.ndarray], list[np.ndarray]] = lambda vector: [vector]) -> None:
        self.updates, self.from_stage, self.to_update = updates, from_stage, to_update
        self.dropped = {dropped} if isinstance(dropped, int) else set(dropped or ())
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in updates}
        self.lost: set[int] = set()

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for sent in messages:
            message = copy.deepcopy(sent)  # as over the wire: the mod consumes the message it gets
            node = message.metadata.dst_node_id
            stage = message.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            if node in self.dropped and (node in self.lost or stage == self.from_stage):
                self.lost.add(node)
                continue

            def train(msg: Message, ctxt: Context, node: int = node) -> Message:
                fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(self.to_update(self.updates[node])), weight(node),
                             {protocol.DEPARTMENT: str(node), protocol.STATUS: protocol.STATUS_TRAINED})
                return Message(compat.fitres_to_recorddict(fit, keep_input=True), reply_to=msg)

            replies.append(secaggplus_mod(message, self.contexts[node], train))
        return replies


def secure_round(workflow: SecAggPlusWorkflow, grid: LossyGrid, *, strategy: Strategy | None = None,
                 start: list[np.ndarray] | None = None) -> np.ndarray | list[np.ndarray] | None:
    """One SecAgg+ fit round; the model it leaves (the strategy's result), or None when the round halted.

    The strategy is Flower's FedAvg over one array starting from zeros, or the one given (with its
    starting arrays); either way it receives what the workflow unmasked.
    """
    manager = SimpleClientManager()
    for node in grid.updates:
        department = Department(str(node))
        department.node_id = node
        manager.register(department)
    start = start or [np.zeros(SHAPE, dtype=np.float32)]
    strategy = strategy or FedAvg(fraction_fit=1.0, min_fit_clients=DEPARTMENTS, min_available_clients=DEPARTMENTS)
    context = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(start), keep_input=True)
    workflow(grid, context)
    model = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
        context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
    if not any(np.any(a != 0) for a in model):
        return None  # a halted round leaves the zeros it started from
    return model[0] if len(model) == 1 else model


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


def test_a_reconstruction_threshold_of_one_tolerates_no_dropout():
    """secagg-reconstruction-threshold reaches Flower's workflow: at 1 every neighbour's share is needed,
    so the smallest sum SecAgg+ can unmask is the whole round (what distributed noise may then be calibrated for)."""
    strict = AuditedSecAggPlusWorkflow(config=RunConfig(model="tiny", labels=("a", "b"), secagg_max_weight=100,
                                                        secagg_reconstruction_threshold=1.0), audit_dir=None)
    assert secure_round(strict, LossyGrid(updates(), dropped=102, from_stage=Stage.COLLECT_MASKED_VECTORS)) is None
    assert secure_round(fedpriv_workflow(), LossyGrid(updates(), dropped=102, from_stage=Stage.COLLECT_MASKED_VECTORS)) is not None


def test_flowers_own_workflow_loses_the_round_when_a_department_drops_before_sharing_keys():
    """The defect the correction is for: with Flower 1.42's workflow the survivors fail in unmask."""
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.6, max_weight=100)
    with pytest.raises(KeyError):
        secure_round(workflow, LossyGrid(updates(), dropped=102, from_stage=Stage.SETUP))


def test_below_the_reconstruction_threshold_the_round_halts_and_is_recorded(tmp_path):
    """Three of four departments gone after key sharing: one masked vector cannot be unmasked alone."""
    from tests.rounds import online
    from tests.test_hostile_participants import strategy

    fed = strategy(tmp_path, secagg=True, dp=False, head_init="zeros", num_server_rounds=2, min_departments=DEPARTMENTS)
    grid = LossyGrid(updates(), dropped={102, 103, 104}, from_stage=Stage.COLLECT_MASKED_VECTORS)
    assert secure_round(fedpriv_workflow(), grid, strategy=fed) is None  # the model is unchanged
    assert not fed.round.aggregated
    fed.configure_evaluate(1, fed.latest_parameters, online(*(str(node) for node in grid.updates)))
    assert any("secure aggregation halted" in note for note in fed.recorder.rounds[1]["failures"])
