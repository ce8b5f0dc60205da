"""An empirical membership-inference audit of a trained run (`fedpriv audit RUN_DIR`).

The game: every department split its records at random (seeded) into training records, which
the model saw, and held-back validation/test records, which it did not: members and non-members
come from the same distribution, so any gap in loss between them is what the model remembers. The attacker sees the
final global model and one record and guesses "member" when the record's loss is below a
threshold (Yeom et al. 2018's loss attack). We report
- AUC of the loss score over members vs non-members, and TPR at 1% and 0.1% FPR;
- an empirical epsilon: a 95% lower bound that any (epsilon, delta)-DP guarantee must respect
  (Jagielski et al. 2020; Nasr et al. 2021): for a threshold picked on one half of the records,
  the other half's Clopper-Pearson bounds give epsilon >= log((1 - delta - FNR_hi) / FPR_hi).
  Picking the threshold on data it is then evaluated on would overstate leakage, hence the halves.
A DP model's empirical epsilon must stay below its claimed epsilon; above it is a bug
(``violation``). The audit needs the records, so it runs on simulation run folders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score, roc_curve

from shared.data import Record, load_records, safe_name
from shared.errors import DataError
from shared.partition import split_department

CONFIDENCE = 0.95


def auc(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counting half."""
    return float(roc_auc_score(_labels(member_scores, non_member_scores), np.concatenate([member_scores, non_member_scores])))


def tpr_at_fpr(member_scores: np.ndarray, non_member_scores: np.ndarray, fpr: float) -> float | None:
    """The best TPR of a threshold whose FPR is at most ``fpr``; None with too few non-members to say."""
    if math.floor(fpr * len(non_member_scores)) < 1:
        return None
    fprs, tprs, _ = roc_curve(_labels(member_scores, non_member_scores),
                              np.concatenate([member_scores, non_member_scores]), drop_intermediate=False)
    return float(tprs[fprs <= fpr].max())


def _labels(member_scores: np.ndarray, non_member_scores: np.ndarray) -> np.ndarray:
    return np.concatenate([np.ones(len(member_scores)), np.zeros(len(non_member_scores))])


def _upper(failures: int, trials: int) -> float:
    """One-sided Clopper-Pearson upper bound on a rate (the upper end of the two-sided exact interval
    at twice the miss rate)."""
    if failures >= trials:
        return 1.0
    return float(binomtest(failures, trials).proportion_ci(confidence_level=2 * CONFIDENCE - 1, method="exact").high)


def empirical_epsilon(
    member_scores: np.ndarray, non_member_scores: np.ndarray, *, delta: float, rng: np.random.Generator
) -> float:
    members, non_members = rng.permutation(member_scores), rng.permutation(non_member_scores)
    pick_m, test_m = np.array_split(members, 2)
    pick_n, test_n = np.array_split(non_members, 2)

    def bound(m: np.ndarray, n: np.ndarray, threshold: float) -> float:
        fpr_hi = _upper(int((n >= threshold).sum()), len(n))
        fnr_hi = _upper(int((m < threshold).sum()), len(m))
        best = 0.0
        for fpr, fnr in ((fpr_hi, fnr_hi), (fnr_hi, fpr_hi)):  # the game read both ways
            if 1 - delta - fnr > 0 and fpr > 0:
                best = max(best, math.log((1 - delta - fnr) / fpr))
        return best

    candidates = np.unique(np.concatenate([pick_m, pick_n]))
    if len(candidates) > 400:
        candidates = np.quantile(candidates, np.linspace(0, 1, 400))
    threshold = max(candidates, key=lambda t: bound(pick_m, pick_n, t))
    return bound(test_m, test_n, float(threshold))


def membership_audit(run_dir: Path, *, seed: int = 0) -> dict[str, Any]:
    """Run the loss attack on the run's final model; its part of ``audit.json``."""
    import torch

    from shared.checkpoint import load_checkpoint
    from shared.evaluation import per_example_losses
    from shared.features import labelled_dataset
    from shared.model import build_classifier, load_backbone, trainable_names
    from shared.params import set_trainable
    from simulation.local.resume import read_run_config

    config = read_run_config(run_dir)
    if not config.partition_dir:
        raise DataError(f"{run_dir}: not a simulation run; the audit needs the departments' records")
    checkpoints = sorted((run_dir / "checkpoints").glob("round-*.safetensors"))
    if not checkpoints:
        raise DataError(f"{run_dir}: no checkpoint: the run trained no round")
    backbone = load_backbone(config.model)
    classifier = build_classifier(backbone, num_labels=len(config.labels), lora_r=config.lora_r,
                                  lora_alpha=config.lora_alpha, lora_targets=config.lora_targets,
                                  lora_layers=config.lora_layers)
    arrays, _ = load_checkpoint(checkpoints[-1])
    set_trainable(classifier, [arrays[name] for name in trainable_names(classifier)])
    module = classifier.feature_head() if config.head_only else classifier

    def scores(records: list[Record], cache_dir: Path) -> np.ndarray:
        if not records:
            return np.empty(0)
        # The same record lists and cache folders as training used: the features are cache hits.
        dataset = labelled_dataset(backbone, records, labels=config.labels, max_length=config.max_length,
                                   head_only=config.head_only, cache_dir=cache_dir)
        return -per_example_losses(module, dataset).to(torch.float64).numpy()

    member_parts, non_member_parts = [], []
    manifest = json.loads((Path(config.partition_dir) / "manifest.json").read_text())
    for department in manifest["departments"]:
        split = split_department(load_records(Path(config.partition_dir) / department["file"]),
                                 val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=config.seed)
        cache = Path(config.feature_cache or run_dir / "departments" / safe_name(department["name"]) / "feature-cache")
        member_parts.append(scores(split.train, cache))
        non_member_parts += [scores(split.val, cache), scores(split.test, cache)]
    # The server's test set is left out on purpose: it may come from another distribution than the
    # departments' records (CLINC150's test split does), and a distribution gap would pass for leakage.
    member_scores, non_member_scores = np.concatenate(member_parts), np.concatenate(non_member_parts)
    claimed = config.target_epsilon if config.dp else None
    empirical = empirical_epsilon(member_scores, non_member_scores, delta=config.target_delta,
                                  rng=np.random.default_rng(seed))
    result = {
        "attack": "loss threshold (Yeom et al. 2018) on the final global model; departments' training vs held-back records",
        "checkpoint": checkpoints[-1].name,
        "members": len(member_scores), "non_members": len(non_member_scores),
        "auc": auc(member_scores, non_member_scores),
        "tpr_at_1pct_fpr": tpr_at_fpr(member_scores, non_member_scores, 0.01),
        "tpr_at_0_1pct_fpr": tpr_at_fpr(member_scores, non_member_scores, 0.001),
        "empirical_epsilon": empirical, "confidence": CONFIDENCE,
        "claimed_epsilon": claimed, "delta": config.target_delta,
        "violation": bool(claimed is not None and empirical > claimed),
    }
    return result
