"""Benchmark table 9: `fedpriv predict --threshold` on CLINC150's out-of-scope queries.

A router should answer "unknown" to a request none of its labels covers. CLINC150 has such queries
(``oos_val``, ``oos_test``); the table gives, per threshold, the in-scope accuracy (right and
answered), the share of in-scope requests turned away, and the out-of-scope recall (turned away).
The default threshold was chosen on ``val`` + ``oos_val`` with a model trained on ``train`` alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

THRESHOLDS = (0.0, 0.2, 0.25, 0.3, 0.4, 0.5)


def out_of_scope_rows(model: Path, clinc: Path, *, in_scope: str = "test", out_of_scope: str = "oos_test",
                      thresholds: tuple[float, ...] = THRESHOLDS) -> list[dict[str, Any]]:
    from shared.export import load_exported

    exported = load_exported(model)
    full = json.loads((clinc / "data_full.json").read_text())

    def top(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        texts, gold = [t for t, _ in full[split]], np.array([label for _, label in full[split]])
        scores, indices = [], []
        for start in range(0, len(texts), 256):
            best = exported.predict(texts[start:start + 256]).max(dim=1)
            scores.append(best.values.numpy())
            indices.append(best.indices.numpy())
        return np.concatenate(scores), np.array(exported.labels)[np.concatenate(indices)], gold

    scores, predicted, gold = top(in_scope)
    oos_scores, _, _ = top(out_of_scope)
    return [{"threshold": t, "in_scope_accuracy": float(((predicted == gold) & (scores >= t)).mean()),
             "in_scope_turned_away": float((scores < t).mean()), "out_of_scope_recall": float((oos_scores < t).mean()),
             "in_scope": len(scores), "out_of_scope": len(oos_scores)} for t in thresholds]


def out_of_scope_markdown(rows: list[dict[str, Any]], *, default: float) -> list[str]:
    lines = ["| threshold | in-scope accuracy (right and answered) | in-scope turned away | out-of-scope recall |",
             "|---|---|---|---|"]
    for r in rows:
        mark = " (default)" if r["threshold"] == default else ""
        lines.append(f"| {r['threshold']:g}{mark} | {r['in_scope_accuracy']:.4f} | {r['in_scope_turned_away']:.4f} | "
                     f"{r['out_of_scope_recall']:.4f} |")
    return lines
