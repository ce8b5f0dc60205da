"""report.html: the central admin's self-contained account of a run (opens offline, no scripts).

Written at the end of every run and again after `fedpriv audit`; `fedpriv report RUN_DIR`
rewrites it. Everything in it is read from the run folder: metrics.json, the server's copy of
the department ledgers, and audit.json when an audit was run.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

from server.ledger_view import LedgerRow, budget_state, ledger_rows
from server.plots import plot_run, run_svg
from server.run_folder import PLOT_FILE, REPORT_FILE, read_metrics, read_status
from shared import protocol
from shared.config import secagg_neighbourhood

AUDIT_FILE = "audit.json"
# transport -> ((state, words) of TLS, (state, words) of node authentication)
TRANSPORT_WORDS = {
    "simulation": (("n/a", "n/a: in-process simulation, no network"), ("n/a", "n/a: simulation")),
    "tls+node-auth": (("on", "on (gRPC over TLS)"), ("on", "on (registered department keys)")),
    "insecure": (("off", "OFF (--insecure)"), ("off", "OFF (--insecure)")),
}
UNKNOWN_TRANSPORT = (("n/a", "?"), ("n/a", "?"))
STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}.bad{color:#b00;font-weight:bold}.ok{color:#070}svg{max-width:100%;height:auto}
.verdict{border:2px solid #444;border-radius:8px;padding:0.5em 1em;margin:1em 0}.verdict p{margin:0.4em 0}
.badge{display:inline-block;padding:3px 9px;border-radius:4px;margin:2px 4px 2px 0;color:#fff;font-weight:600}
.on,.within{background:#2e7d32}.near{background:#e65100}.off,.spent,.refused{background:#c62828}.na,.no-dp{background:#616161}
"""
BADGE_CLASS = {"on": "on", "off": "off", "n/a": "na"}
APPROVED_CODE = {
    "simulation": ("na", "approved code: n/a (simulation)"),
    "tls+node-auth": ("on", "approved code: each department's SuperNode runs only the app code its kit pins"),
    "insecure": ("off", "approved code: not checked (--insecure test bench)"),
}


def _fmt(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _table(headers: list[str] | None, rows: list[list[str]]) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>" if headers else ""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _badge(state: str, text: str) -> str:
    return f"<span class='badge {html.escape(state)}'>{html.escape(text)}</span>"


def _verdict(metrics: dict[str, Any], status: dict[str, Any], ledger: list[LedgerRow]) -> str:
    """What a person should take in at a glance: the outcome, the protections, every department's budget."""
    transport = metrics.get("transport", "simulation")
    tls, auth = TRANSPORT_WORDS.get(transport, UNKNOWN_TRANSPORT)
    state = status.get("state", metrics.get("status"))
    accuracy = metrics.get("final_accuracy")
    outcome = (f"final accuracy <b>{_fmt(accuracy)}</b> ({html.escape(str(metrics.get('final_accuracy_source')))})"
               if accuracy is not None else "no accuracy measured")
    headline = f"<p class='outcome'><b>{html.escape(str(state))}</b>: {outcome}"
    if status.get("message"):
        headline += f"<br>{html.escape(status['message'])}"
    protections = [
        ("on" if metrics.get("dp") else "off", f"differential privacy: {'on' if metrics.get('dp') else 'OFF (--no-dp)'}"),
        ("on" if metrics.get("secure_aggregation") else "off",
         f"secure aggregation: {'on (SecAgg+)' if metrics.get('secure_aggregation') else 'OFF'}"),
        (BADGE_CLASS[tls[0]], f"TLS: {tls[0]}"),
        (BADGE_CLASS[auth[0]], f"node authentication: {auth[0]}"),
        APPROVED_CODE.get(transport, ("na", "approved code: ?")),
    ]
    departments = [
        _badge(budget_state(row).replace(" ", "-"),
               f"{row.department}: no DP" if row.epsilon is None
               else f"{row.department}: epsilon {row.epsilon:.2f} of {_fmt(row.budget, 'g')} ({budget_state(row)})")
        for row in ledger
    ]
    return ("<div class='verdict'>" + headline + "</p><p class='protections'>"
            + "".join(_badge(cls, text) for cls, text in protections) + "</p><p class='budgets'>"
            + ("".join(departments) or "no department reported") + "</p></div>")


def _summary(metrics: dict[str, Any], status: dict[str, Any]) -> str:
    (_, tls), (_, auth) = TRANSPORT_WORDS.get(metrics.get("transport", "simulation"), UNKNOWN_TRANSPORT)
    config = metrics.get("config", {})
    statistics, rounds = config.get("head-init") == "class-statistics", int(config.get("num-server-rounds", 1))
    mechanisms = ", then DP-SGD" if statistics and rounds > 1 else "" if statistics else "DP-SGD"
    centring = statistics and float(config.get("centering-share", 0)) > 0
    mechanisms = ("Gaussian feature mean, " if centring else "") + ("Gaussian class statistics" if statistics else "") + mechanisms
    dp = (f"{mechanisms}, run epsilon {config.get('target-epsilon')}, delta {config.get('target-delta')}, "
          f"{config.get('accountant')} accountant" if metrics.get("dp")
          else "<span class='bad'>NO differential privacy (--no-dp): no privacy guarantee holds</span>")
    rows = [
        ["state", html.escape(f"{status.get('state', metrics.get('status'))} {status.get('message') or ''}")],
        ["final accuracy", f"{_fmt(metrics.get('final_accuracy'))} ({html.escape(str(metrics.get('final_accuracy_source')))})"],
        ["differential privacy", dp],
        ["secure aggregation", f"on (Flower SecAgg+, {secagg_neighbourhood(config.get('secagg-num-shares') or 0)})" if metrics.get("secure_aggregation")
         else "<span class='bad'>OFF: the server saw each update</span>"],
        ["TLS", html.escape(tls)], ["node authentication", html.escape(auth)],
        ["rounds", f"{len(metrics['rounds'])} of {config.get('num-server-rounds')}"],
        ["model", html.escape(f"{config.get('model')} (lora-r {config.get('lora-r')})")],
        ["wall time", f"{_fmt(metrics.get('wall_time_s'), '.0f')} s"],
    ]
    return _table(None, rows)


def _ledger(ledger: list[LedgerRow]) -> str:
    shared = any(r.own_epsilon is not None for r in ledger)  # distributed noise: two guarantees per department
    rows = [
        [html.escape(r.department), _fmt(r.epsilon), *([_fmt(r.own_epsilon)] if shared else []), _fmt(r.budget, "g"),
         _fmt(r.delta, "g"), str(r.rounds_trained),
         _badge(budget_state(r).replace(" ", "-"), budget_state(r)) + " " + html.escape(r.status), html.escape(r.check)]
        for r in ledger
    ]
    own = ["own epsilon (its noise share unmasked alone)"] if shared else []
    return _table(["department", "epsilon spent", *own, "budget", "delta", "rounds trained", "status",
                   "server's recomputation"], rows)


def _stage(metrics: dict[str, Any], number: int) -> str:
    """A round's stage in the run's words: stage 1's releases, or stage 2's DP-SGD."""
    if number == metrics.get("centering_round"):
        return "1: feature mean"
    return "1: class statistics" if number == metrics.get("statistics_round") else "2: DP-SGD"


def _rounds(metrics: dict[str, Any]) -> str:
    rows = []
    for entry in metrics["rounds"]:
        departments = entry.get("departments", {})
        trained = sum(1 for d in departments.values() if d.get("status") == protocol.STATUS_TRAINED)
        declined = sorted(f"{n} ({d['status']})" for n, d in departments.items()
                          if d.get("status") not in (None, protocol.STATUS_TRAINED))
        failures = entry.get("failures", [])
        check = entry.get("aggregate_check")
        check_cell = {"passed": "<span class='ok'>passed</span>", "rejected": "<span class='bad'>rejected</span>"}.get(
            check, "-")
        rows.append([
            str(entry["round"]), html.escape(_stage(metrics, entry["round"])),
            _fmt(entry.get("accuracy")), _fmt(entry.get("loss")), _fmt(entry.get("train_loss")),
            check_cell, "on" if entry.get("secure_aggregation") else "off", str(trained),
            html.escape(", ".join(declined)) or "-",
            "<br>".join(f"<span class='bad'>{html.escape(f)}</span>" for f in failures) or "-",
        ])
    return _table(["round", "stage", "accuracy", "loss", "train loss", "aggregate check", "SecAgg+", "departments trained",
                   "declined", "dropouts / failures"], rows)


def _audit(run_dir: Path) -> str:
    path = run_dir / AUDIT_FILE
    if not path.is_file():
        return ("<p>No audit was run. <code>fedpriv audit RUN_DIR --canaries M</code> runs a canary audit of the "
                "departments' releases and a membership-inference attack.</p>")
    audit = json.loads(path.read_text())
    verdict = ("<span class='bad'>AN AUDIT BOUND IS ABOVE THE CLAIMED EPSILON: a privacy bug</span>"
               if audit.get("violation") else "<span class='ok'>consistent with the claimed guarantee</span>")
    rows = []
    for stage in audit.get("canary_audit", {}).get("stages", []):
        claimed = stage.get("claimed_epsilon")
        who = f" (department {stage['department']}, on its own host)" if "department" in stage else ""
        rows += [
            ["canary audit", html.escape(stage["audited"] + who)],
            ["canaries / guesses / right", f"{stage['canaries']} / {stage['guesses']} / {stage['correct_guesses']}"],
            [f"epsilon lower bound ({stage['confidence']:.1%} confidence)", _fmt(stage["epsilon_lower_bound"])],
            ["epsilon the audited stage claims", _fmt(claimed) if claimed is not None else "none (no DP)"],
        ]
    if "attack" in audit:  # simulation only: the attack needs every department's records
        rows += [
            ["membership attack", html.escape(audit["attack"])],
            ["members / non-members", f"{audit['members']} / {audit['non_members']}"],
            ["AUC", _fmt(audit["auc"])],
            ["TPR at 1% FPR", _fmt(audit["tpr_at_1pct_fpr"])], ["TPR at 0.1% FPR", _fmt(audit["tpr_at_0_1pct_fpr"])],
            ["empirical epsilon of the attack (95% lower bound)", _fmt(audit["empirical_epsilon"])],
            ["claimed epsilon of the run", _fmt(audit.get("claimed_epsilon"), "g") if audit.get("claimed_epsilon") else "none (no DP)"],
        ]
    rows.append(["verdict", verdict])
    return _table(None, rows)


def write_report(run_dir: Path) -> Path:
    """report.html and the accuracy/epsilon picture, from what the run folder holds now."""
    metrics = read_metrics(run_dir)
    status = read_status(run_dir)
    ledger = ledger_rows(run_dir)
    if metrics["rounds"]:
        plot_run(metrics, run_dir / PLOT_FILE, ledger=ledger)
    sections = [
        f"<h1>fedpriv run report</h1><p>{html.escape(str(run_dir))}<br>written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
        _verdict(metrics, status, ledger),
        "<h2>Summary</h2>", _summary(metrics, status),
        "<h2>Privacy ledger per department</h2>", _ledger(ledger),
        "<h2>Accuracy, loss and epsilon per round</h2>", run_svg(metrics, ledger=ledger),
        "<h2>Rounds</h2>", _rounds(metrics),
        "<h2>Privacy audit</h2>", _audit(run_dir),
    ]
    path = run_dir / REPORT_FILE
    tmp = path.with_suffix(".html.tmp")  # whole or not at all: `fedpriv run` stops following when it appears
    tmp.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>fedpriv report</title>"
                   f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")
    tmp.replace(path)
    return path
