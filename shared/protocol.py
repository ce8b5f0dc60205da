"""What travels between the server and departments in each round's messages, declared once.

Server -> department: a ``FitRequest`` (train or release) or an ``EvaluateRequest``, built by the
server's strategy and read back by the department with every missing or malformed value named.
A request carries only what the department cannot know from the run config it already has:
the round and its stage, how many departments it aggregates, the server's backbone fingerprint
(compared with the department's own backbone), the server's mask generator (compared with the
department's own) and the server's copy of the ledger indexes (compared with the department's
ledger). Whether a reply is masked by SecAgg+ is not a request value at all: the department
knows it from how the message reached it (``client.secure_aggregation``).
Department -> server (metrics): who it is, what it spent (its new ledger lines), how training went.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from flwr.common import Scalar

from shared.errors import ConfigError

SERVER_ROUND = "server-round"
STAGE = "stage"  # what a round asks for: a feature-mean or class-statistics release (stage 1), or DP-SGD training
STAGE_FEATURE_MEAN = "feature-mean"
STAGE_STATISTICS = "class-statistics"
STAGE_DP_SGD = "dp-sgd"
AGGREGATE_SIZE = "aggregate-size"
BACKBONE_FINGERPRINT = "backbone-fingerprint"
EVALUATION_SPLIT = "split"  # which split a department evaluates on: its test split in the last round
SPLIT_VAL = "val"
SPLIT_TEST = "test"
LEDGER_INDEXES = "ledger-indexes"  # JSON: department file name -> last ledger index the server holds
SECAGG_MASKS = "secagg-masks"  # the mask generator the server unmasks with (shared.secagg_masks.NAME)

DEPARTMENT = "department"
STATUS = "status"
STATUS_TRAINED = "trained"
STATUS_BUDGET_EXHAUSTED = "budget-exhausted"
STATUS_POLICY_REFUSED = "policy-refused"
STATUS_FAILED = "failed"  # the department could not serve the request; REASON says why, without record content
STATUS_REJECTED = "rejected"  # the server left the update out: not finite, out of range or overweight
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"
DELTA = "delta"
BUDGET = "budget"
LEDGER_ENTRY = "ledger-entry"  # the JSON lines (one per mechanism) the department just appended to its ledger
RELEASED_LABELS = "released-labels"  # stage 1: how many labels' sums a department released (a DP output)
NOISE_MULTIPLIER = "noise-multiplier"
DP_ENABLED = "dp"
STEPS = "steps"
SIGNATURE = "signature"  # deployment: the department's signature of its reply (shared.reply_signature)
ACCURACY = "accuracy"
EVALUATION_WITHHELD = "evaluation-withheld"  # under DP a department sends no evaluation numbers
REASON = "reason"
OUT_OF_RANGE = "out-of-range"  # values SecAgg+ will clip to +-clipping range (it does so silently)


class _Reader:
    """Reads typed values out of a request, collecting every problem."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.problems: list[str] = []

    def get(self, key: str, kind: type, *, choices: tuple[str, ...] = ()) -> Any:
        if key not in self.config:
            self.problems.append(f"'{key}' is missing")
            return kind()
        value = self.config[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            self.problems.append(f"'{key}' must be a whole number >= 0 (got {value!r})")
            return 0
        if kind is str and not isinstance(value, str):
            self.problems.append(f"'{key}' must be text (got {value!r})")
            return ""
        if choices and value not in choices:
            self.problems.append(f"'{key}' must be one of {', '.join(choices)} (got {value!r})")
        return value

    def check(self, department: str) -> None:
        if self.problems:
            raise ConfigError(self.problems, source=f"request to department {department}")


@dataclass(frozen=True, kw_only=True)
class FitRequest:
    server_round: int
    stage: str
    aggregate_size: int
    backbone_fingerprint: str
    secagg_masks: str
    ledger_indexes: dict[str, int]

    def to_config(self) -> dict[str, Scalar]:
        return {SERVER_ROUND: self.server_round, STAGE: self.stage, AGGREGATE_SIZE: self.aggregate_size,
                BACKBONE_FINGERPRINT: self.backbone_fingerprint, SECAGG_MASKS: self.secagg_masks,
                LEDGER_INDEXES: json.dumps(self.ledger_indexes)}

    @classmethod
    def from_config(cls, config: dict[str, Any], *, department: str) -> FitRequest:
        read = _Reader(config)
        request = cls(
            server_round=read.get(SERVER_ROUND, int), stage=read.get(STAGE, str, choices=(STAGE_FEATURE_MEAN, STAGE_STATISTICS, STAGE_DP_SGD)),
            aggregate_size=read.get(AGGREGATE_SIZE, int), backbone_fingerprint=read.get(BACKBONE_FINGERPRINT, str),
            secagg_masks=read.get(SECAGG_MASKS, str), ledger_indexes=_ledger_indexes(read.get(LEDGER_INDEXES, str), read),
        )
        read.check(department)
        return request


@dataclass(frozen=True, kw_only=True)
class EvaluateRequest:
    server_round: int
    backbone_fingerprint: str
    split: str

    def to_config(self) -> dict[str, Scalar]:
        return {SERVER_ROUND: self.server_round, BACKBONE_FINGERPRINT: self.backbone_fingerprint, EVALUATION_SPLIT: self.split}

    @classmethod
    def from_config(cls, config: dict[str, Any], *, department: str) -> EvaluateRequest:
        read = _Reader(config)
        request = cls(server_round=read.get(SERVER_ROUND, int), backbone_fingerprint=read.get(BACKBONE_FINGERPRINT, str),
                      split=read.get(EVALUATION_SPLIT, str, choices=(SPLIT_VAL, SPLIT_TEST)))
        read.check(department)
        return request


def _ledger_indexes(text: str, read: _Reader) -> dict[str, int]:
    try:
        indexes = json.loads(text or "{}")
    except json.JSONDecodeError:
        indexes = None
    if not isinstance(indexes, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in indexes.values()):
        read.problems.append(f"'{LEDGER_INDEXES}' is not a JSON object of ledger indexes")
        return {}
    return indexes
