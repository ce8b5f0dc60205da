"""The audit's statistics on inputs with known answers, the scale fit, and `fedpriv bench --quick` on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.data import Record
from simulation.audit.membership import auc, empirical_epsilon, tpr_at_fpr
from simulation.bench.scale import growth_exponent, stratified

FEDPRIV = str(Path(sys.executable).parent / "fedpriv")


def test_auc_of_separated_identical_and_reversed_scores():
    members, non_members = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0])
    assert auc(members, non_members) == 1.0
    assert auc(non_members, members) == 0.0
    assert auc(np.ones(5), np.ones(7)) == 0.5  # ties count half
    assert auc(np.array([1.0, 3.0]), np.array([2.0])) == 0.5


def test_tpr_at_low_fpr_respects_the_false_positive_budget():
    non_members = np.arange(1000, dtype=float)  # 1% FPR: 10 non-members may score above the threshold
    members = np.array([995.5, 990.5, 980.0, 5.0])
    assert tpr_at_fpr(members, non_members, 0.01) == 0.5  # 995.5 and 990.5 beat the 11th-highest non-member (989)
    assert tpr_at_fpr(members, non_members[:50], 0.01) is None  # 0.5 non-members: too few to say


def test_empirical_epsilon_is_zero_without_leakage_and_large_with_it():
    rng = np.random.default_rng(0)
    same = empirical_epsilon(rng.normal(size=4000), rng.normal(size=4000), delta=1e-5, rng=rng)
    assert same < 0.2
    separated = empirical_epsilon(rng.normal(10, 1, 4000), rng.normal(0, 1, 4000), delta=1e-5, rng=rng)
    # perfectly separated halves of 2000: Clopper-Pearson caps the bound near log(2000 / 3)
    assert 5.5 < separated < 8.0


def test_growth_exponent_and_stratified_sampling():
    assert growth_exponent([10, 50, 100], [2.0, 10.0, 20.0]) == pytest.approx(1.0)
    assert growth_exponent([10, 100], [5.0, 5.0]) == pytest.approx(0.0)
    records = [Record(f"t{i}", f"l{i % 3}") for i in range(30)]
    picked = stratified(records, 6, seed=0)
    assert len(picked) == 6 and sorted(r.label for r in picked) == ["l0", "l0", "l1", "l1", "l2", "l2"]


@pytest.mark.slow
def test_bench_quick_overhead_piece_writes_well_formed_results(tmp_path):
    env = dict(os.environ, FEDPRIV_CLINC150=str(tmp_path / "absent"))
    result = subprocess.run([FEDPRIV, "bench", "--quick", "--only", "overhead", "--only", "scale", "--model", "tiny",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    overhead = json.loads((tmp_path / "bench-results" / "overhead.json").read_text())
    head, lora = overhead["throughput"]
    assert (head["lora_r"], lora["lora_r"]) == (0, 8)
    for t in (head, lora):
        assert t["plain_samples_per_s"]["median"] > 0 and t["dp_samples_per_s"]["median"] > 0
        assert t["dp_over_plain"]["n"] == 3 and t["records"] > 0
    assert overhead["peak_memory_mb"]["dp"] > 100
    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## 2. DP overhead" in markdown and "| LoRA r=8 + head (hooks mode) |" in markdown
    assert "## 4. Scale" in markdown and "Skipped: CLINC150 not found" in markdown
    bench = json.loads((tmp_path / "bench-results" / "bench.json").read_text())
    assert bench["machine"]["cpus"] >= 1 and bench["quick"] is True


def test_the_one_sided_clopper_pearson_bound_is_the_beta_quantile():
    from scipy.stats import beta

    from simulation.audit.membership import CONFIDENCE, _upper

    for failures, trials in ((0, 10), (3, 50), (49, 50), (10, 1000)):
        assert _upper(failures, trials) == pytest.approx(beta.ppf(CONFIDENCE, failures + 1, trials - failures), rel=1e-9)
    assert _upper(5, 5) == 1.0


def test_the_stage_one_weight_sweep_scores_every_design_on_every_split_and_epsilon(tmp_path):
    from simulation.bench.stage_one_weights import EPSILONS, WEIGHTINGS, weight_sweep, weight_sweep_markdown

    domains = {"banking": ["balance", "transfer", "freeze"], "travel": ["flight", "hotel", "visa"]}
    intents = [i for group in domains.values() for i in group]

    def split(count: int, tag: str) -> list[list[str]]:
        return [[f"{tag} {intent} request number {i}", intent] for intent in intents for i in range(count)]

    data = tmp_path / "clinc150"
    data.mkdir()
    test = [["what is my balance", "balance"]]
    (data / "data_full.json").write_text(json.dumps({"train": split(12, "train"), "val": split(3, "val"), "test": test,
                                                      "oos_train": [], "oos_val": [], "oos_test": []}))
    (data / "domains.json").write_text(json.dumps(domains))
    sweep = weight_sweep(data=data, out=tmp_path / "out", model="tiny", draws=1)
    assert len(sweep["cells"]) == 2 * len(EPSILONS) * len(WEIGHTINGS)
    assert all(0.0 <= cell["val_accuracy"] <= 1.0 and len(cell["draws"]) == 1 for cell in sweep["cells"])
    markdown = "\n".join(weight_sweep_markdown(sweep))
    assert "(default)" in markdown and "Dirichlet(0.5), epsilon 8" in markdown
