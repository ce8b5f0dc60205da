"""The admin's picture of a run: accuracy and loss per round, each department's epsilon over the rounds,
and each department's final spending as a bar against its budget (coloured by how the budget stands).

One figure, saved as PNG next to metrics.json and embedded as SVG in report.html.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

STATE_COLOURS = {"within": "#2e7d32", "near": "#e65100", "spent": "#c62828", "refused": "#c62828", "no DP": "#616161"}
LINE_STYLES = ["-", "--", "-.", ":"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _figure(metrics: dict[str, Any], ledger: list | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = metrics["rounds"]
    fig, (acc_ax, loss_ax, eps_ax, bar_ax) = plt.subplots(1, 4, figsize=(19, 4.2))
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
    budgets = set()
    for index, name in enumerate(names):
        points = [(r["round"], r["departments"][name].get("epsilon")) for r in rounds if name in r["departments"]]
        points = [(x, e) for x, e in points if e is not None]
        if points:  # departments often spend alike: each its own dash and marker, so overlapping lines stay visible
            line = eps_ax.plot(*zip(*points, strict=True), linestyle=LINE_STYLES[index % len(LINE_STYLES)],
                               marker=MARKERS[index % len(MARKERS)], markersize=7 - 4 * index / max(len(names), 1),
                               label=name, alpha=0.85)[0]
            line.set_gid(f"epsilon-{name}")
            budget = metrics["privacy"].get(name, {}).get("budget")
            if budget:
                budgets.add(budget)
    for budget in sorted(budgets):
        eps_ax.axhline(budget, color="#c62828", linestyle="--", linewidth=1.6)
        eps_ax.annotate(f"budget {budget:g}", (0.01, budget), xycoords=("axes fraction", "data"), color="#c62828",
                        fontsize=8, va="bottom")
    title = "epsilon per department over rounds" if metrics.get("dp") else "NO differential privacy (--no-dp)"
    eps_ax.set(xlabel="round", ylabel="epsilon", title=title)
    if eps_ax.get_lines() and len(names) <= 12:
        eps_ax.legend(fontsize=7)
    rows = [row for row in (ledger or []) if row.epsilon is not None]
    if rows:  # every department's final spending against its budget: one bar each, never hidden by another
        from server.ledger_view import budget_state

        positions = range(len(rows))
        bars = bar_ax.barh(positions, [row.epsilon for row in rows],
                           color=[STATE_COLOURS[budget_state(row)] for row in rows])
        for bar, row in zip(bars, rows, strict=True):
            bar.set_gid(f"spent-{row.department}")
            if row.budget is not None:
                bar_ax.plot([row.budget, row.budget], [bar.get_y() - 0.1, bar.get_y() + bar.get_height() + 0.1],
                            color="black", linewidth=2.5)
        bar_ax.set_yticks(list(positions), [row.department for row in rows], fontsize=8)
        bar_ax.invert_yaxis()
        bar_ax.set(xlabel="epsilon spent (black: budget)", title="budget per department")
    else:
        bar_ax.set_axis_off()
    highest = max([*budgets, *(max(line.get_ydata()) for line in eps_ax.get_lines() if len(line.get_ydata()))], default=1.0)
    eps_ax.set_ylim(0, highest * 1.12)  # from zero, with room above the budget line
    last_round = max((r["round"] for r in rounds), default=1)
    for ax in (acc_ax, loss_ax, eps_ax):
        ax.grid(alpha=0.3)
        if last_round <= 12:  # short runs: one tick per round, not fractions of one
            ax.set_xticks(range(1, last_round + 1))
            ax.set_xlim(0.5, last_round + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def plot_run(metrics: dict[str, Any], path: Path, *, ledger: list | None = None) -> None:
    fig = _figure(metrics, ledger)
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_svg(metrics: dict[str, Any], *, ledger: list | None = None) -> str:
    fig = _figure(metrics, ledger)
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prologue: the SVG sits inside HTML
