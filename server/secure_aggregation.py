"""Flower's SecAgg+ workflow for the fit stage, optionally recording what the server receives.

With ``audit-updates`` on, the server saves each department's reply in the masked-vector stage
exactly as it arrives (the masked, quantized vector), so an audit can check that nothing the
server holds for a single department resembles that department's update. The masking, secret
sharing and unmasking are Flower's own, with one correction:

Flower 1.42 treats every department sampled at setup as a participant in the unmask stage, so a
department that drops out before it has shared its keys (a host that dies, a link that is down:
it is still sampled until its heartbeat expires) is listed as "dead" to the survivors, who hold no
share of its key: each survivor's ``_unmask`` raises ``KeyError`` and the round is lost, although
the threshold holds. Only departments that completed key sharing ever entered anyone's masks
(``secaggplus_mod`` masks with the sources of the forwarded shares), so after each of the first two
stages the protocol's participants are narrowed to those that answered (``_forget_dropped``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server import Grid
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from shared import protocol, secagg_masks
from shared.config import RunConfig


class _RecordingGrid:
    """Passes every call through to Flower's grid; keeps a copy of each masked-vector reply."""

    def __init__(self, grid: Any, folder: Path, server_round: int) -> None:
        self._grid, self._folder, self._round = grid, folder, server_round

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *args: Any, **kwargs: Any) -> Any:
        replies = list(self._grid.send_and_receive(messages, *args, **kwargs))
        for reply in replies:
            if reply.has_error():
                continue
            masked = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
            metrics = compat.recorddict_to_fitres(reply.content, keep_input=True).metrics
            department = metrics.get(protocol.DEPARTMENT, reply.metadata.src_node_id)
            np.savez(self._folder / f"masked-round-{self._round:03d}-{department}.npz",
                     *[bytes_to_ndarray(b) for b in masked])
        return replies


class AuditedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ with fedpriv's settings, the audit tap, and a neighbourhood sized per round.

    Key sharing uses Shamir secret sharing in pure Python: every department splits its secrets into
    one share per neighbour and the server recombines a threshold of them per department, so a full
    mesh costs ~N^3 field operations a round (py-spy: they dominate the 26 s SecAgg+ round at 50
    departments, which takes 2 s without SecAgg+).
    ``secagg-num-shares`` k bounds the neighbourhood to k - 1 random departments (a fresh random ring
    each round); a round that asks k or fewer departments uses the full mesh.
    """

    def __init__(self, *, config: RunConfig, audit_dir: Path | None) -> None:
        secagg_masks.install()  # unmask with the same cryptographic generator the departments mask with
        self.neighbourhood = config.secagg_num_shares
        super().__init__(
            num_shares=1.0,  # every department shares its keys with every other, unless setup_stage narrows it
            reconstruction_threshold=config.secagg_reconstruction_threshold,
            max_weight=config.secagg_max_weight,
            clipping_range=config.secagg_clipping_range,
            quantization_range=config.secagg_quantization_range,
            timeout=config.secagg_timeout_s,
        )
        self.audit_dir = audit_dir

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        secagg_masks.check()
        if self.neighbourhood:  # Flower's setup stage then asks the strategy for the same round's departments
            current_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
            departments = len(context.strategy.begin_round(current_round, context.client_manager).asked)
            self.num_shares = self.neighbourhood if self.neighbourhood < departments else 1.0
        return super().setup_stage(grid, context, state) and self._forget_dropped(state)

    def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
        return super().share_keys_stage(grid, context, state) and self._forget_dropped(state)

    def _forget_dropped(self, state: Any) -> bool:
        """Departments that did not answer this stage left the protocol before any mask used their
        keys: no longer participants (or anyone's neighbours); then the threshold is rechecked."""
        answered = set(state.active_node_ids)
        state.sampled_node_ids = answered
        state.nid_to_neighbours = {
            node: neighbours & answered for node, neighbours in state.nid_to_neighbours.items() if node in answered
        }
        return self._check_threshold(state)

    def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
        if self.audit_dir is None:
            return super().collect_masked_vectors_stage(grid, context, state)
        server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        recording = cast(Grid, _RecordingGrid(grid, self.audit_dir, server_round))  # a Grid by delegation
        return super().collect_masked_vectors_stage(recording, context, state)
