"""Turning one data set into a simulated federation: department files, a manifest, a test split.

Everything a user can get wrong about the data is checked here, before Flower starts: bad files,
unknown labels in the test split, departments too small for the batch size, a delta that is not
below 1/records. Each department's records then sit in their own JSONL file, as they would on
separate hosts, and the department clients read only their own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.label_scope import SCOPE_KEY, parse_label_scope
from client.privacy import MIN_TRAIN_RECORDS
from shared import partition
from shared.data import DEFAULT_COLUMNS, Columns, Record, check_labels, derive_labels, load_records, safe_name, write_jsonl
from shared.errors import ConfigError, DataError
from simulation.local import clinc150
from simulation.local.demo_corpus import DESCRIPTION as DEMO_DESCRIPTION
from simulation.local.demo_corpus import demo_label_scopes, demo_records


@dataclass(frozen=True)
class DataPlan:
    data: Path | None
    test_data: Path | None
    partition: str | None
    departments: int | None
    alpha: float
    seed: int
    declared_scopes: bool = True  # the label scopes CLINC150's domains.json / the demo's design declare
    columns: Columns = DEFAULT_COLUMNS  # the names of the user's text, label and department columns


@dataclass(frozen=True)
class Department:
    name: str
    file: str
    records: int
    train_records: int
    labels: int
    scoped: bool  # trains only the head rows of its declared label scope
    policy: Mapping[str, Any]  # its budget, site policy and label scope, as the manifest records them


@dataclass(frozen=True)
class Federation:
    partition_dir: Path
    description: str
    labels: tuple[str, ...]
    departments: tuple[Department, ...]
    test_file: Path | None


SERVER_TEST_FRACTION = 0.1


def _source_records(plan: DataPlan) -> tuple[list[Record], list[Record] | None, str, dict | None]:
    """(pool, test or None, description, domains or None)."""
    if plan.data is None:
        return demo_records(), None, DEMO_DESCRIPTION, None
    if clinc150.is_clinc150_dir(plan.data):
        data = clinc150.load_clinc150(plan.data)
        return data.pool, data.test, f"CLINC150 in-scope ({plan.data})", data.domains
    if plan.data.is_dir():
        raise DataError(f"{plan.data}: a folder that is not CLINC150; give a .csv or .jsonl file")
    return load_records(plan.data, columns=plan.columns), None, str(plan.data), None


def _scheme(plan: DataPlan, domains: dict | None) -> str:
    return plan.partition or ("domain" if domains else "column")


def _partition(plan: DataPlan, pool: list[Record], domains: dict | None) -> dict[str, list[Record]]:
    scheme = _scheme(plan, domains)
    if scheme not in partition.PARTITIONS:
        raise ConfigError(f"--partition must be one of {', '.join(partition.PARTITIONS)} (got {scheme!r})")
    if plan.departments is not None and plan.departments < 1:
        raise ConfigError(f"--departments must be >= 1 (got {plan.departments})")
    if scheme in ("column", "domain") and plan.departments is not None:
        raise ConfigError(f"--departments applies to dirichlet and iid; --partition {scheme} decides the departments itself")
    if scheme == "column":
        if not any(r.department for r in pool):
            raise DataError(
                f"{plan.data}: no '{plan.columns.department}' column; add one, name yours with --department-column, "
                "or choose --partition dirichlet/iid with --departments N"
            )
        return partition.by_column(pool)
    if scheme == "domain":
        if domains is None:
            raise ConfigError("--partition domain needs the CLINC150 folder as --data (it defines the domains)")
        return partition.by_domain(pool, domains)
    count = plan.departments or 4
    if scheme == "iid":
        return partition.iid(pool, num_departments=count, seed=plan.seed)
    return partition.dirichlet(pool, num_departments=count, alpha=plan.alpha, seed=plan.seed, min_records=2)


@dataclass(frozen=True)
class Partitioned:
    description: str
    labels: tuple[str, ...]
    shares: dict[str, list[Record]]
    test: list[Record]
    # Label scopes that come with the data's public description: CLINC150's domains.json for the
    # domain partition, the demo corpus's design for its departments (client.label_scope).
    declared_scopes: dict[str, tuple[str, ...]]

    def largest_train_split(self, *, val_fraction: float, test_fraction: float, seed: int) -> int:
        """Training records of the largest department (the default batch fits it: smaller departments
        sample a quarter of theirs, ``client.privacy.department_batch``)."""
        return max(
            len(partition.split_department(records, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed).train)
            for records in self.shares.values()
        )


def partition_data(plan: DataPlan) -> Partitioned:
    pool, test, description, domains = _source_records(plan)
    labels = derive_labels(pool)
    if len(labels) < 2:
        raise DataError(f"{description}: needs at least 2 distinct labels, found {len(labels)}")
    if plan.test_data is not None:
        test = load_records(plan.test_data, columns=plan.columns.without_department())  # its departments play no part
    if test is None:
        # Under DP departments send no evaluation numbers (client.department), so a simulation's
        # server holds a test split of its own, carved from the pool before it is partitioned.
        pool, test = partition.hold_out(pool, fraction=SERVER_TEST_FRACTION, seed=plan.seed)
    check_labels(test, labels)
    shares = _partition(plan, pool, domains)
    if not shares:
        raise DataError(f"{description}: no departments after partitioning")
    scopes: dict[str, tuple[str, ...]] = {}
    if not plan.declared_scopes:
        pass  # as a user's own departments would: no scopes, stage 1 finds the labels from noisy counts
    elif _scheme(plan, domains) == "domain" and domains:
        scopes = {name: tuple(intents) for name, intents in domains.items() if name in shares}
    elif plan.data is None and _scheme(plan, domains) == "column":
        scopes = {name: intents for name, intents in demo_label_scopes().items() if name in shares}
    return Partitioned(description, labels, shares, test, scopes)


def plan_federation(
    data: Partitioned, *, out_dir: Path, val_fraction: float, test_fraction: float, delta: float,
    dp: bool, seed: int, policies: Mapping[str, Mapping[str, Any]],
) -> Federation:
    """Check every department against the training settings; the federation's files, not yet written."""
    problems = [
        f"--budget/--policy/--label-scope name a department '{name}' that this partition does not have "
        f"(departments: {', '.join(sorted(data.shares))})"
        for name in sorted(set(policies) - set(data.shares))
    ]
    settings = {name: dict(policies.get(name, {})) for name in data.shares}
    for name, scope in data.declared_scopes.items():
        settings[name].setdefault(SCOPE_KEY, ",".join(scope))
    departments = []
    for name, records in data.shares.items():
        if SCOPE_KEY in settings[name]:
            try:
                scope = parse_label_scope(settings[name][SCOPE_KEY], department=name, labels=data.labels)
                check_labels(records, scope or data.labels, described_as=f"department {name}'s label-scope")
            except ConfigError as exc:
                problems += [f"department {name}: {problem}" for problem in exc.problems]
            except DataError as exc:
                problems.append(str(exc))
        split = partition.split_department(records, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        train = len(split.train)
        if train < MIN_TRAIN_RECORDS or not split.val:
            problems.append(
                f"department {name}: {len(records)} records leave {train} for training and {len(split.val)} for "
                f"validation; needs at least {MIN_TRAIN_RECORDS} for training and 1 for validation"
            )
        if dp and not delta < 1 / max(train, 1):
            problems.append(f"department {name}: delta={delta} must be below 1/records = 1/{train}")
        departments.append(
            Department(name, f"departments/{safe_name(name)}.jsonl", len(records), train, len({r.label for r in records}),
                       scoped=SCOPE_KEY in settings[name], policy=settings[name])
        )
    if problems:
        raise DataError("cannot train these departments:\n" + "\n".join(f"  - {p}" for p in problems))
    partition_dir = out_dir / "federation"
    test_file = partition_dir / "test.jsonl" if data.test is not None else None
    return Federation(partition_dir, data.description, data.labels, tuple(departments), test_file)


def write_federation(data: Partitioned, federation: Federation) -> None:
    """Write one file per department, the test split and the manifest of a planned federation."""
    for department in federation.departments:
        write_jsonl(data.shares[department.name], federation.partition_dir / department.file)
    if federation.test_file is not None and data.test is not None:
        write_jsonl(data.test, federation.test_file)
    manifest = {
        "description": data.description,
        "labels": list(data.labels),
        "departments": [
            {"name": d.name, "file": d.file, "records": d.records, "policy": dict(d.policy)}
            for d in federation.departments
        ],
    }
    (federation.partition_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
