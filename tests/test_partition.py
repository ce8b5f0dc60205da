"""Partitioners and the per-department split: deterministic, complete, and shaped as promised."""

from __future__ import annotations

from collections import Counter

import pytest

from shared import partition
from shared.data import Record
from shared.errors import DataError
from simulation.local.demo_corpus import demo_records

RECORDS = [Record(f"text {i}", f"label{i % 6}", None, f"f:{i}") for i in range(300)]


def texts(shares):
    return sorted(r.text for rs in shares.values() for r in rs)


def test_by_column_uses_department_and_requires_it():
    shares = partition.by_column(demo_records())
    assert sorted(shares) == ["facilities", "finance", "hr", "it"]
    assert all(r.department == name for name, rs in shares.items() for r in rs)
    with pytest.raises(DataError, match="department"):
        partition.by_column(RECORDS)


def test_by_domain_is_label_disjoint():
    domains = {"a": ["label0", "label1"], "b": ["label2", "label3"], "c": ["label4", "label5"]}
    shares = partition.by_domain(RECORDS, domains)
    assert {name: {r.label for r in rs} for name, rs in shares.items()} == {k: set(v) for k, v in domains.items()}
    with pytest.raises(DataError, match="label4"):
        partition.by_domain(RECORDS, {"a": ["label0", "label1", "label2", "label3"]})


def test_iid_covers_every_record_once_and_is_seeded():
    shares = partition.iid(RECORDS, num_departments=4, seed=1)
    assert texts(shares) == sorted(r.text for r in RECORDS)
    assert {len(rs) for rs in shares.values()} == {75}
    assert partition.iid(RECORDS, num_departments=4, seed=1) == shares
    assert partition.iid(RECORDS, num_departments=4, seed=2) != shares


def test_dirichlet_skews_labels_and_covers_every_record():
    skewed = partition.dirichlet(RECORDS, num_departments=5, alpha=0.1, seed=0, min_records=1)
    assert texts(skewed) == sorted(r.text for r in RECORDS)
    uniform = partition.dirichlet(RECORDS, num_departments=5, alpha=1000.0, seed=0, min_records=1)

    def top_label_share(shares):
        return sum(Counter(r.label for r in rs).most_common(1)[0][1] / len(rs) for rs in shares.values()) / len(shares)

    assert top_label_share(skewed) > top_label_share(uniform) + 0.2
    assert partition.dirichlet(RECORDS, num_departments=5, alpha=0.1, seed=0) == skewed


def test_bad_partition_arguments():
    with pytest.raises(DataError, match="alpha"):
        partition.dirichlet(RECORDS, num_departments=3, alpha=0, seed=0)
    with pytest.raises(DataError, match="cannot be split"):
        partition.iid(RECORDS[:2], num_departments=3, seed=0)
    with pytest.raises(DataError, match="could not give"):
        partition.dirichlet(RECORDS[:12], num_departments=10, alpha=0.01, seed=0, min_records=5)


def test_department_split_is_disjoint_seeded_and_sized():
    split = partition.split_department(RECORDS, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert (len(split.train), len(split.val), len(split.test)) == (210, 30, 60)
    parts = [{r.text for r in part} for part in (split.train, split.val, split.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert partition.split_department(RECORDS, val_fraction=0.1, test_fraction=0.2, seed=3) == split
    assert partition.split_department(RECORDS, val_fraction=0.1, test_fraction=0.0, seed=3).test == []


def test_demo_corpus_is_synthetic_deterministic_and_balanced():
    from simulation.local.demo_corpus import DESCRIPTION, RECORDS_PER_INTENT

    assert "SYNTHETIC" in DESCRIPTION
    records = demo_records()
    assert records == demo_records()
    assert set(Counter(r.label for r in records).values()) == {RECORDS_PER_INTENT}
