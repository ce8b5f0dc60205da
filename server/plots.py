"""The admin's picture of a run: accuracy and loss per round, each department's epsilon against its budget.

One figure, saved as PNG next to metrics.json and embedded as SVG in report.html.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any


def _figure(metrics: dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = metrics["rounds"]
    fig, (acc_ax, loss_ax, eps_ax) = plt.subplots(1, 3, figsize=(15, 4))
    evaluated = [r for r in rounds if r.get("accuracy") is not None]
    xs = [r["round"] for r in evaluated]
    acc_ax.plot(xs, [r["accuracy"] for r in evaluated], marker="o")
    acc_ax.set(xlabel="round", ylabel="accuracy", title=f"accuracy ({metrics.get('final_accuracy_source')})")
    loss_ax.plot(xs, [r["loss"] for r in evaluated], marker="o", label="evaluation loss")
    trained = [r for r in rounds if r.get("train_loss") is not None]
    loss_ax.plot([r["round"] for r in trained], [r["train_loss"] for r in trained], marker=".", label="train loss")
    loss_ax.set(xlabel="round", ylabel="loss", title="loss")
    loss_ax.legend(fontsize=7)
    names = sorted({n for r in rounds for n in r["departments"]})
    for name in names:
        points = [(r["round"], r["departments"][name].get("epsilon")) for r in rounds if name in r["departments"]]
        points = [(x, e) for x, e in points if e is not None]
        if points:
            line = eps_ax.plot(*zip(*points, strict=True), marker=".", label=name)[0]
            budget = metrics["privacy"].get(name, {}).get("budget")
            if budget:
                eps_ax.axhline(budget, color=line.get_color(), linestyle=":", linewidth=0.8)
    title = "epsilon per department (dotted: budget)" if metrics.get("dp") else "NO differential privacy (--no-dp)"
    eps_ax.set(xlabel="round", ylabel="epsilon", title=title)
    if names and len(names) <= 12:
        eps_ax.legend(fontsize=7)
    for ax in (acc_ax, loss_ax, eps_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_run(metrics: dict[str, Any], path: Path) -> None:
    fig = _figure(metrics)
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_svg(metrics: dict[str, Any]) -> str:
    fig = _figure(metrics)
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prologue: the SVG sits inside HTML
