"""A canary audit in one run of what the departments release (`fedpriv audit RUN_DIR --canaries M`):
the stage-1 release here, the DP-SGD rounds in ``simulation.audit.canary_training``; each stage gets its
own M canaries and its own bound, at a confidence split between the stages.

Stage 1:
The audit makes its own copy of each department's release with canaries in it; the run, its
model and its ledgers are never touched. White-box and in the department's place: the auditor
knows the department's records and sees exactly what the department would release.

- A canary is a feature vector (unit length, the most a record may contribute) joined to one of
  the labels the department holds the most records of, so that its row is released. Canaries
  sharing a row get orthogonal directions: the row's sum separates them exactly.
- Each canary is included with probability 1/2; the department then runs its own stage-1
  calibration (``plan_stage_one``: the run's epsilon, the department's budget and policy) and its
  own mechanism (``release_statistics``, fresh noise).
- A canary's score is the released row, divided by its weight (public post-processing of the noisy
  counts, which the auditor undoes to see the mechanism's own output), minus the exact sum of the
  department's real records there, projected on the canary's direction: 1 plus the row's noise when included, the noise
  alone when not. Guesses come from the public midpoint 1/2; the bound is
  ``simulation.audit.one_run``'s, against the largest epsilon any audited department claims.

Without DP the release is exact and every guess is right (the bound is as high as m canaries
allow); with DP the noise hides the canaries; a release that adds less noise than its ledger
charges shows as a bound above the claim: a privacy bug.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.class_statistics import class_sums, plan_stage_one, release_statistics
from shared import protocol
from shared.accounting import epsilon_of
from shared.config import RunConfig
from shared.data import DEFAULT_COLUMNS, Columns
from simulation.audit.one_run import bound_from_scores

CONFIDENCE = 0.95


def canary_rows(targets: torch.Tensor, *, num_labels: int, canaries: int, width: int, rows: list[int] | None) -> list[int]:
    """The row of each canary: the department's largest labels first (within ``rows`` when it
    declares a scope), at most ``width`` canaries a row (one orthogonal direction each)."""
    counts = torch.bincount(targets, minlength=num_labels)
    candidates = [int(r) for r in torch.argsort(counts, descending=True) if counts[r] > 0 and (rows is None or int(r) in rows)]
    if canaries > width * len(candidates):
        raise ValueError(f"{canaries} canaries do not fit in {len(candidates)} labels of {width} directions")
    per_row = -(-canaries // len(candidates))  # spread evenly: ceil
    return [candidates[i // per_row] for i in range(canaries)]


def audit_department_release(
    features: torch.Tensor, targets: torch.Tensor, *, config: RunConfig, budget: float, delta: float,
    scope_rows: list[int] | None, canaries: int, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Canary scores, which canaries were included, and the epsilon the release claims (None: no DP)."""
    num_labels, width = len(config.labels), features.shape[1]
    rows = canary_rows(targets, num_labels=num_labels, canaries=canaries, width=width, rows=scope_rows)
    directions = np.zeros((canaries, width))
    for row in set(rows):
        members = [i for i, r in enumerate(rows) if r == row]
        basis, _ = np.linalg.qr(rng.normal(size=(width, len(members))))  # orthonormal columns
        directions[members] = basis.T
    included = rng.random(canaries) < 0.5
    canary_features = torch.tensor(directions[included], dtype=features.dtype)
    canary_targets = torch.tensor(np.asarray(rows)[included], dtype=targets.dtype)
    plan = claimed = None
    if config.dp:
        plan = plan_stage_one(config, budget=budget, delta=delta, prior=[], before_stage=[], release_counts=scope_rows is None)
        claimed = epsilon_of(plan.mechanisms, delta=delta, accountant=config.accountant)
    release = release_statistics(
        torch.cat([features, canary_features]), torch.cat([targets, canary_targets]), num_labels=num_labels,
        plan=plan, scope_rows=scope_rows, generator=torch.Generator().manual_seed(secrets.randbits(63)),
    )
    exact, _ = class_sums(features, targets, num_labels=num_labels)  # the department's own records
    weights = release.weights.numpy()
    released = weights > 0
    noisy_sums = np.divide(release.sums.numpy(), weights[:, None], out=np.zeros(exact.shape), where=released[:, None])
    residual = (noisy_sums - exact.numpy())[rows]
    scores = np.einsum("ij,ij->i", residual, directions)
    scores[~released[rows]] = 0.5  # a row the release withheld says nothing: least confident, last guessed
    return scores, included, claimed


def _stage_one_scores(backbone, settings, data, config: RunConfig, *, canaries: int, total: int, departments: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float | None]:
    from shared.errors import DataError
    from shared.features import cached_features

    label_index = {label: i for i, label in enumerate(config.labels)}
    features = cached_features(backbone, [r.text for r in data.train], max_length=config.max_length,
                               cache_dir=settings.feature_cache)
    targets = torch.tensor([label_index[r.label] for r in data.train])
    scope = [label_index[label] for label in settings.label_scope] if settings.label_scope else None
    room = features.shape[1] * len(set(targets.tolist()) & set(scope if scope is not None else targets.tolist()))
    if canaries > room:
        raise DataError(f"--canaries {total}: department {settings.name} can hold {room} canaries (its labels x "
                        f"{features.shape[1]} orthogonal directions), not {canaries}; use at most {room * departments}")
    scores, included, claimed = audit_department_release(
        features, targets, config=config, budget=settings.policy.effective_budget(config),
        delta=settings.policy.delta, scope_rows=scope, canaries=canaries, rng=rng)
    return scores - 0.5, included, claimed  # 1/2: the midpoint between an included canary's score and none


def _dp_sgd_scores(backbone, settings, data, config: RunConfig, *, canaries: int, total: int, departments: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float | None]:
    from simulation.audit.canary_training import audit_department_training

    scores, included, threshold, claimed = audit_department_training(
        backbone=backbone, settings=settings, data=data, config=config, canaries=canaries, rng=rng)
    return scores - threshold, included, claimed


STAGES = {
    protocol.STAGE_STATISTICS: ("stage 1: each department's class-statistics release (white-box: canary features at the "
                         "release, scored against the department's exact sums)", _stage_one_scores),
    protocol.STAGE_DP_SGD: ("stage 2: each department's DP-SGD rounds (canary records with labels of their own, scored by how much "
               "training raised their own logit)", _dp_sgd_scores),
}


def canary_audit(run_dir: Path, *, canaries: int, seed: int = 0) -> dict[str, Any]:
    """The canary audit of a simulation run: every stage it ran, m canaries per stage, in copies."""
    from client.department_data import load_department, resolve_department
    from shared.errors import DataError
    from simulation.local.resume import read_run_config

    config = read_run_config(run_dir)
    if not config.partition_dir:
        raise DataError(f"{run_dir}: not a simulation run; its departments audit themselves "
                        "(`fedpriv department audit` on each department's host)")
    manifest = json.loads((Path(config.partition_dir) / "manifest.json").read_text())
    departments = []
    for index in range(len(manifest["departments"])):
        settings = resolve_department(config, {"partition-id": index})
        departments.append((settings, load_department(settings, config)))
    return audit_departments(config, departments, canaries=canaries, seed=seed)


def department_canary_audit(kit: Path, *, data: Path, run_config: Path, canaries: int, seed: int = 0,
                            columns: Columns = DEFAULT_COLUMNS) -> dict[str, Any]:
    """One deployed department audits itself on its own host, with its kit's budget, policy and
    scope and a run's settings (the run folder's ``run_config.toml``); its records never leave it,
    and its real ledger and state are not touched (the audit's state lives in a scratch folder)."""
    import tempfile
    import tomllib

    from client.department_data import load_department, resolve_department
    from shared.errors import ConfigError
    from simulation.deploy.supernode import department_own_settings, read_kit

    kit_settings = read_kit(kit, insecure=True)
    try:
        config = RunConfig.from_run_config(tomllib.loads(run_config.read_text()))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--run-config {run_config}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="fedpriv-department-audit-") as scratch:
        node_config = {"department": kit_settings["department"], "data-path": str(data.resolve()),
                       "state-dir": scratch, "text-column": columns.text, "label-column": columns.label,
                       **department_own_settings(kit, kit_settings, epsilon=None)}
        settings = resolve_department(config, node_config)
        return audit_departments(config, [(settings, load_department(settings, config))], canaries=canaries, seed=seed)


def audit_departments(config: RunConfig, departments: list, *, canaries: int, seed: int) -> dict[str, Any]:
    """Every stage the run plans, m canaries per stage shared among ``departments``."""
    from rich.progress import track

    from shared.errors import DataError
    from shared.model import load_backbone

    if canaries < 10:
        raise DataError(f"--canaries must be at least 10 (got {canaries}): fewer guesses cannot bound epsilon")
    backbone = load_backbone(config.model)
    rng = np.random.default_rng(seed)
    stages = [name for name, ran in ((protocol.STAGE_STATISTICS, config.statistics_round), (protocol.STAGE_DP_SGD, config.dp_sgd_rounds)) if ran]
    confidence = 1 - (1 - CONFIDENCE) / len(stages)  # every stage's bound holds together at CONFIDENCE
    results = []
    for stage in stages:
        audited, department_scores = STAGES[stage]
        shares = np.array_split(np.arange(canaries), len(departments))
        scores, included, claims = [], [], {}
        for (settings, data), share in track(list(zip(departments, shares, strict=True)), description=f"canary audit, {stage}",
                                             transient=True):
            s, i, claimed = department_scores(backbone, settings, data, config, canaries=len(share), total=canaries,
                                              departments=len(departments), rng=rng)
            scores.append(s)
            included.append(i)
            claims[settings.name] = claimed
        bound = bound_from_scores(np.concatenate(scores), np.concatenate(included), threshold=0.0,
                                  delta=max(s.policy.delta for s, _ in departments), confidence=confidence)
        claimed = max(claims.values()) if config.dp else None
        results.append({
            "stage": stage, "audited": audited,
            "canaries": bound.canaries, "guesses": bound.guesses, "correct_guesses": bound.correct,
            "tries": bound.tries, "epsilon_lower_bound": bound.epsilon, "confidence": bound.confidence,
            "claimed_epsilon": claimed, "claimed_by_department": claims,
            "violation": bool(claimed is not None and bound.epsilon > claimed),
        })
    return {"stages": results, "confidence": CONFIDENCE, "violation": any(r["violation"] for r in results)}
