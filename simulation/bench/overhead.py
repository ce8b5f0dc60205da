"""Benchmark table 2: what DP-SGD costs a department, in throughput and in memory.

Throughput: one department's records, the run's model, batch and learning rate; one local epoch
of plain SGD and one of Opacus DP-SGD (the noise the federation would use at epsilon 8 over 40
rounds), alternated in this one process so that the machine's noise hits both alike, repeated.
Memory: a department's whole round (read the file, load the backbone, embed, train one round,
account) in a fresh process, whose peak RSS is read from the kernel (ru_maxrss), with and without DP.
Run as a module it is that fresh process: ``python -m simulation.bench.overhead DATA.jsonl MODEL dp|plain``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.config import DEFAULTS, RunConfig
from shared.data import Record, write_jsonl
from simulation.bench.runs import spread


def throughput(
    *, records: list[Record], labels: tuple[str, ...], model: str, repeats: int, cache_dir: Path, lora_r: int = 0,
    batch_size: int = DEFAULTS.batch_size,
) -> dict[str, Any]:
    """Samples/s of one local epoch, plain and DP, alternated; ``lora_r`` 0 trains the head on cached
    features (the default model), above 0 LoRA adapters and head through the whole Transformer."""
    from client.dp_training import train_plain, train_private
    from client.privacy import PrivacyPlan, calibrate_noise, department_batch, poisson_schedule
    from shared.features import labelled_dataset
    from shared.model import build_classifier, load_backbone

    backbone = load_backbone(model)
    classifier = build_classifier(backbone, num_labels=len(labels), lora_r=lora_r, lora_alpha=DEFAULTS.lora_alpha,
                                  lora_targets=DEFAULTS.lora_targets)
    dataset = labelled_dataset(backbone, records, labels=labels, max_length=DEFAULTS.max_length, head_only=lora_r == 0,
                               cache_dir=cache_dir)
    batch = department_batch(num_records=len(dataset), batch_size=batch_size).expected  # as a department samples
    rate, steps = poisson_schedule(num_records=len(dataset), batch_size=batch, local_epochs=1)
    sigma = calibrate_noise(target_epsilon=8.0, delta=DEFAULTS.target_delta, sample_rate=rate,
                            steps=steps * DEFAULTS.num_server_rounds, prior=[], accountant=DEFAULTS.accountant)
    plan = PrivacyPlan(sigma, rate, steps, DEFAULTS.num_server_rounds, 8.0, 8.0, DEFAULTS.target_delta,
                       DEFAULTS.accountant)
    common = {"module": classifier.head if lora_r == 0 else classifier, "dataset": dataset, "batch_size": batch,
              "local_epochs": 1, "learning_rate": DEFAULTS.learning_rate if lora_r == 0 else 0.5,
              "momentum": DEFAULTS.momentum}
    plain_rates, dp_rates = [], []
    for repeat in range(repeats):
        started = time.perf_counter()
        train_plain(**common, seed=repeat)
        plain_rates.append(len(dataset) / (time.perf_counter() - started))
        started = time.perf_counter()
        train_private(**common, plan=plan, prior=[], max_grad_norm=DEFAULTS.max_grad_norm)
        dp_rates.append(len(dataset) / (time.perf_counter() - started))
    ratios = [d / p for d, p in zip(dp_rates, plain_rates, strict=True)]
    return {"records": len(dataset), "labels": len(labels), "batch_size": batch, "noise_multiplier": sigma, "model": model,
            "lora_r": lora_r, "plain_samples_per_s": spread(plain_rates), "dp_samples_per_s": spread(dp_rates),
            "dp_over_plain": spread(ratios)}


def department_peak_memory(*, records: list[Record], labels: tuple[str, ...], model: str) -> dict[str, float]:
    """Peak RSS (MB) of a fresh process doing one department's round, with DP and without."""
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "department.jsonl"
        write_jsonl(records, data)
        peaks = {}
        for mode in ("plain", "dp"):
            result = subprocess.run([sys.executable, "-m", "simulation.bench.overhead", str(data), model, mode,
                                     json.dumps(list(labels))],
                                    capture_output=True, text=True, check=True)
            peaks[mode] = json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return peaks


def _one_department_round(data: Path, model: str, mode: str, labels: tuple[str, ...]) -> None:
    from client.department import DepartmentClient
    from client.department_data import resolve_department
    from shared import protocol, secagg_masks
    from shared.data import load_records
    from shared.model import load_backbone
    from shared.params import get_trainable

    records = load_records(data)
    state = Path(tempfile.mkdtemp())
    config = RunConfig(model=model, labels=labels, dp=mode == "dp", out_dir=str(state), head_init="zeros",
                       batch_size=min(DEFAULTS.batch_size, len(records) // 5), secagg=False)  # masking is table 3's
    settings = resolve_department(config, {"department": "bench", "data-path": str(data), "state-dir": str(state)})
    client = DepartmentClient(config=config, settings=settings, run_id=1)
    request = protocol.FitRequest(server_round=1, stage=protocol.STAGE_DP_SGD, aggregate_size=2, ledger_indexes={},
                                  backbone_fingerprint=load_backbone(model).fingerprint, secagg_masks=secagg_masks.NAME)
    _, _, metrics = client.fit(get_trainable(client.classifier), request.to_config())
    if metrics[protocol.STATUS] != protocol.STATUS_TRAINED:
        raise RuntimeError(f"the measured department did not train: {metrics.get(protocol.REASON)}")
    print(json.dumps({"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def overhead_markdown(result: dict[str, Any]) -> list[str]:
    memory = result["peak_memory_mb"]

    def spread_text(s: dict[str, float], unit: str = "", spec: str = ".3g") -> str:
        return f"{s['median']:{spec}}{unit} ({s['min']:{spec}} .. {s['max']:{spec}})"

    lines = ["| trained parameters | records | batch | noise multiplier | plain samples/s | DP-SGD samples/s | "
             "DP / plain (median, min .. max) | target >= 0.9x |", "|---|---|---|---|---|---|---|---|"]
    for t in result["throughput"]:
        what = "head on frozen features (default)" if not t["lora_r"] else f"LoRA r={t['lora_r']} + head (hooks mode)"
        ratio = t["dp_over_plain"]["median"]
        lines.append(f"| {what} | {t['records']} | {t['batch_size']} | {t['noise_multiplier']:.3f} | "
                     f"{spread_text(t['plain_samples_per_s'])} | {spread_text(t['dp_samples_per_s'])} | "
                     f"{spread_text(t['dp_over_plain'], 'x', '.4f')} | {'met' if ratio >= 0.9 else 'MISSED'} |")
    repeats = result["throughput"][0]["dp_over_plain"]["n"]
    return lines + [
        "", f"Model {result['throughput'][0]['model']}, {result['throughput'][0]['labels']} labels (the federation's); "
        f"one local epoch each, plain and DP alternated, {repeats} repeats.",
        f"Peak RSS of a department's whole round (fresh process: read, embed, train, account): plain "
        f"{memory['plain']:.0f} MB, DP {memory['dp']:.0f} MB (target <= 1536 MB: {'met' if memory['dp'] <= 1536 else 'MISSED'}).",
    ]


if __name__ == "__main__":
    _one_department_round(Path(sys.argv[1]), sys.argv[2], sys.argv[3], tuple(json.loads(sys.argv[4])))
