"""Server-side evaluation of the global model on a held-out test split, once per round."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.strategy import EvaluateFn
from shared import protocol
from shared.config import RunConfig
from shared.data import DEFAULT_COLUMNS, check_labels, load_records
from shared.evaluation import evaluate_module
from shared.features import labelled_dataset
from shared.model import Backbone, TextClassifier
from shared.params import set_trainable


def make_server_evaluator(
    *, config: RunConfig, classifier: TextClassifier, backbone: Backbone, cache_dir: Path
) -> EvaluateFn | None:
    """An ``evaluate_fn`` for FedAvg when the run has ``test-data``; None for federated evaluation only."""
    if not config.test_data:
        return None
    records = load_records(config.test_data, columns=DEFAULT_COLUMNS.without_department())  # a test set's departments play no part
    check_labels(records, config.labels)
    dataset = labelled_dataset(
        backbone, records, labels=config.labels, max_length=config.max_length,
        head_only=config.head_only, cache_dir=cache_dir,
    )
    module = classifier.feature_head() if config.head_only else classifier

    def evaluate(server_round: int, arrays: list[np.ndarray], _config: dict) -> tuple[float, dict]:
        set_trainable(classifier, arrays)
        loss, accuracy = evaluate_module(module, dataset)
        return loss, {protocol.ACCURACY: accuracy}

    return evaluate
