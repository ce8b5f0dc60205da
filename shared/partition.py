"""Splitting one data set into departments (simulation) and a department's records into train/validation.

Partitioners, all deterministic for a given seed:
- ``by_column``: the ``department`` column of the records (how real federations look);
- ``by_domain``: a mapping domain -> labels, e.g. CLINC150's 10 domains (label-disjoint departments);
- ``dirichlet``: label skew, each label's records spread over departments by Dirichlet(alpha);
- ``iid``: a uniform random split.

They are written here rather than taken from flwr-datasets, whose partitioners work on Hugging Face
``datasets`` objects: that package (and pyarrow) would be a large dependency of every department
for four short functions over plain records.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from shared.data import Record, check_department_names
from shared.errors import DataError

PARTITIONS = ("column", "domain", "dirichlet", "iid")


def by_column(records: Sequence[Record]) -> dict[str, list[Record]]:
    missing = [r.source for r in records if not r.department]
    if missing:
        raise DataError(
            f"--partition column needs a 'department' value on every record; {len(missing)} record(s) "
            f"have none, first at {missing[0]}"
        )
    departments: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        departments[r.department].append(r)  # type: ignore[index]
    check_department_names(sorted(departments), source=f"'department' column of {records[0].source.rsplit(':', 1)[0]}")
    return dict(sorted(departments.items()))


def by_domain(records: Sequence[Record], domains: Mapping[str, Sequence[str]]) -> dict[str, list[Record]]:
    domain_of = {label: domain for domain, labels in domains.items() for label in labels}
    unmapped = sorted({r.label for r in records if r.label not in domain_of})
    if unmapped:
        raise DataError(f"--partition domain: label(s) in no domain: {', '.join(unmapped[:10])}")
    departments: dict[str, list[Record]] = {domain: [] for domain in domains}
    for r in records:
        departments[domain_of[r.label]].append(Record(r.text, r.label, domain_of[r.label], r.source))
    return {name: rs for name, rs in departments.items() if rs}


def iid(records: Sequence[Record], *, num_departments: int, seed: int) -> dict[str, list[Record]]:
    _check_count(records, num_departments)
    order = list(records)
    random.Random(seed).shuffle(order)
    return {
        _name(i, num_departments): [_tag(r, _name(i, num_departments)) for r in order[i::num_departments]]
        for i in range(num_departments)
    }


def dirichlet(
    records: Sequence[Record], *, num_departments: int, alpha: float, seed: int, min_records: int = 1
) -> dict[str, list[Record]]:
    """Label skew: for each label, draw department shares from Dirichlet(alpha)."""
    if alpha <= 0:
        raise DataError(f"--alpha must be > 0 (got {alpha})")
    _check_count(records, num_departments)
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_label[r.label].append(r)
    for _attempt in range(100):
        shares: list[list[Record]] = [[] for _ in range(num_departments)]
        for label in sorted(by_label):
            label_records = list(by_label[label])
            rng.shuffle(label_records)  # type: ignore[arg-type]
            proportions = rng.dirichlet([alpha] * num_departments)
            cuts = (np.cumsum(proportions)[:-1] * len(label_records)).astype(int)
            for i, part in enumerate(np.split(np.array(label_records, dtype=object), cuts)):
                shares[i].extend(part.tolist())
        if min(len(s) for s in shares) >= min_records:
            return {
                _name(i, num_departments): [_tag(r, _name(i, num_departments)) for r in share]
                for i, share in enumerate(shares)
            }
    raise DataError(
        f"--partition dirichlet: could not give each of {num_departments} departments {min_records} records "
        f"with alpha={alpha}; use fewer departments or a larger alpha"
    )


@dataclass(frozen=True)
class Split:
    train: list[Record]
    val: list[Record]
    test: list[Record]


def split_department(records: Sequence[Record], *, val_fraction: float, test_fraction: float, seed: int) -> Split:
    """Seeded train/validation/test split of one department's records; only train is trained on."""
    order = list(records)
    random.Random(seed).shuffle(order)
    num_val = max(1, round(len(order) * val_fraction)) if len(order) > 1 else 0
    num_test = max(1, round(len(order) * test_fraction)) if test_fraction > 0 and len(order) > 2 else 0
    return Split(
        train=order[num_val + num_test :], val=order[:num_val], test=order[num_val : num_val + num_test]
    )


def hold_out(records: Sequence[Record], *, fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(kept, held out): a seeded share of a simulation's pool that only the server evaluates on."""
    order = list(records)
    random.Random(seed ^ 0x5EED).shuffle(order)
    count = round(len(order) * fraction)
    return order[count:], order[:count]


def _check_count(records: Sequence[Record], num_departments: int) -> None:
    if num_departments < 1:
        raise DataError(f"--departments must be >= 1 (got {num_departments})")
    if len(records) < num_departments:
        raise DataError(f"{len(records)} records cannot be split into {num_departments} departments")


def _name(index: int, total: int) -> str:
    return f"dept-{index + 1:0{len(str(total))}d}"


def _tag(record: Record, department: str) -> Record:
    return Record(record.text, record.label, department, record.source)
