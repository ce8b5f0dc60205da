"""A PNG of a run for the admin: accuracy per round, and each department's epsilon against its budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_run(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = metrics["rounds"]
    fig, (acc_ax, eps_ax) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r["round"] for r in rounds if r.get("accuracy") is not None]
    acc_ax.plot(xs, [r["accuracy"] for r in rounds if r.get("accuracy") is not None], marker="o")
    acc_ax.set(xlabel="round", ylabel="accuracy", title=f"accuracy ({metrics.get('final_accuracy_source')})")
    acc_ax.grid(alpha=0.3)
    names = sorted({n for r in rounds for n in r["departments"]})
    for name in names:
        points = [(r["round"], r["departments"][name].get("epsilon")) for r in rounds if name in r["departments"]]
        points = [(x, e) for x, e in points if e is not None]
        if points:
            line = eps_ax.plot(*zip(*points, strict=True), marker=".", label=name)[0]
            budget = metrics["privacy"].get(name, {}).get("target_epsilon")
            if budget:
                eps_ax.axhline(budget, color=line.get_color(), linestyle=":", linewidth=0.8)
    title = "epsilon per department (dotted: budget)" if metrics.get("dp") else "NO differential privacy (--no-dp)"
    eps_ax.set(xlabel="round", ylabel="epsilon", title=title)
    eps_ax.grid(alpha=0.3)
    if names and len(names) <= 12:
        eps_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
