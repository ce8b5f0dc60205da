"""The training options `fedpriv simulate` and `fedpriv run` share, declared once (``TRAINING``); the run folder rule."""

from __future__ import annotations

import functools
import inspect
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from shared.config import DEFAULTS
from shared.errors import ConfigError
from shared.schedule import default_schedule

Rounds = Annotated[int | None, typer.Option(help="Federated rounds: round 1 releases the DP feature mean, round 2 DP class statistics (stage 1); any later rounds fine-tune the head with DP-SGD. Default: 22 at epsilon >= 8 or without DP, else 2 (stage 2 costs accuracy at small epsilon; see BENCHMARKS.md).")]
HeadInit = Annotated[str, typer.Option(help="class-statistics: round 1 builds the head from each department's DP class statistics (default); zeros: every round is DP-SGD from a zero head (the earlier design).")]
LocalEpochs = Annotated[int | None, typer.Option(help="Local epochs per DP-SGD round. Default: 1 with DP (more epochs spend the budget on noisier steps), 10 without. With --distributed-noise a round is one step.")]
LearningRate = Annotated[float | None, typer.Option(help="Local SGD learning rate. Default: 2.5, or 20 with --distributed-noise (one step a round).")]
StatisticsShare = Annotated[float, typer.Option(help="When DP-SGD rounds follow stage 1: the share of each department's epsilon that stage 1's class statistics spend (the rest is DP-SGD's).")]
CenteringShare = Annotated[float, typer.Option(help="The share of stage 1's noise precision that round 1's DP feature mean spends (features are centred on it); 0: no feature-mean round, uncentred features.")]
Momentum = Annotated[float, typer.Option(help="SGD momentum of the DP-SGD rounds.")]
NcmLogitScale = Annotated[float, typer.Option(help="Where stage 1 is the whole run: its head's logits are this times the cosine to each class mean (how confident its probabilities are).")]
StageTwoLogitScale = Annotated[float, typer.Option(help="Where DP-SGD rounds follow stage 1: the logit scale of the head they start from.")]
ServerMomentum = Annotated[float | None, typer.Option(help="The server's momentum over DP-SGD rounds (FedAvgM; post-processing, no privacy cost); 0: plain FedAvg. Default: 0.5, or 0.9 with --distributed-noise.")]
DistributedNoise = Annotated[bool, typer.Option("--distributed-noise", help="Distributed noise: each department that consents (its site policy) adds only its share of the noise, so the SecAgg+ sum carries one release's worth, in stage 1 and in each DP-SGD round (then one step a round). Trusts SecAgg+ and the other departments; each ledger records both epsilons. Needs SecAgg+.")]
MaxGradNorm = Annotated[float, typer.Option(help="Per-sample clipping bound.")]
Epsilon = Annotated[float, typer.Option(help="Each department's privacy budget epsilon over the whole run (a department may set a lower one).")]
Delta = Annotated[float, typer.Option(help="Each department's delta; must be below 1/records.")]
Accountant = Annotated[str, typer.Option(help="Privacy accountant: rdp or prv.")]
Model = Annotated[str, typer.Option(help="minilm (packaged all-MiniLM-L6-v2), tiny (tests), or a local Hugging Face model folder (on every host).")]
LoraR = Annotated[int, typer.Option(help="LoRA rank for the DP-SGD rounds; 0 trains only the head on frozen features.")]
LoraLayers = Annotated[int, typer.Option(help="With --lora-r: adapters only in the top N Transformer layers, trained on cached states of the layers below (several times faster); 0: every layer.")]
LoraAlpha = Annotated[int, typer.Option(help="LoRA scaling alpha (with --lora-r).")]
LoraTargets = Annotated[str, typer.Option(help="Comma-separated module names that get LoRA adapters (with --lora-r).")]
MaxLength = Annotated[int, typer.Option(help="Tokens per text; longer texts are truncated.")]
FractionTrain = Annotated[float, typer.Option(help="Share of the departments with budget left that a DP-SGD round asks (at least --min-departments).")]
ValFraction = Annotated[float, typer.Option(help="Share of each department's records it keeps back for validation.")]
TestData = Annotated[Path | None, typer.Option(help="Held-out CSV/JSONL for server-side evaluation.")]
NoDp = Annotated[bool, typer.Option("--no-dp", help="Baseline WITHOUT differential privacy: no guarantee holds.")]
NoSecagg = Annotated[bool, typer.Option("--no-secagg", help="Baseline without SecAgg+: the server sees each department's update.")]
SecaggReconstructionThreshold = Annotated[float, typer.Option(help="The share of a department's SecAgg+ neighbours needed to unmask the sum, in (0.5, 1]: the round survives dropouts down to it, and distributed noise is calibrated for it (higher: fewer dropouts tolerated, smaller noise shares).")]
SecaggNumShares = Annotated[int, typer.Option(help="SecAgg+ neighbourhood: 0 = every department with every other (default, strongest); an odd k >= 3 = k - 1 random neighbours per round, for large federations (a server colluding with all of a department's neighbours could unmask it).")]
TextColumn = Annotated[str, typer.Option(help="The column (CSV header or JSONL key) that holds each record's text.")]
LabelColumn = Annotated[str, typer.Option(help="The column that holds each record's label.")]
DepartmentColumn = Annotated[str, typer.Option(help="The column that names each record's department (--partition column).")]
MinDepartments = Annotated[int, typer.Option(help="Departments a round needs (a deployed run waits until that many are connected); the run ends when fewer can still train.")]
DepartmentOwned = Annotated[list[str] | None, typer.Option(hidden=True)]
Out = Annotated[Path | None, typer.Option(help="Run folder on this host (default: fedpriv-runs/<time>).")]

DEPARTMENT_OWNED = ("--budget, --policy and --label-scope belong to each department in a deployment: set them in its "
                    "kit's department.toml (epsilon, [policy], label-scope) or with `fedpriv department start --epsilon`; "
                    "the server cannot set or override them")

NO_DP_WARNING = "[bold red]WARNING: --no-dp: NO differential privacy. No privacy guarantee holds for this run.[/]"


def run_dir_path(out: Path | None) -> Path:
    """The run folder, not yet created; an existing folder that already holds files is refused."""
    run_dir = (out or Path("fedpriv-runs") / time.strftime("%Y%m%d-%H%M%S")).expanduser().resolve()
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"--out {run_dir} already holds files; choose a new run folder")
    return run_dir


def new_run_dir(out: Path | None) -> Path:
    """The run folder, created (call it once every setting has been validated)."""
    run_dir = run_dir_path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def module_names(text: str) -> tuple[str, ...]:
    """``--lora-targets query,value`` as ("query", "value")."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


# The training options `simulate` and `run` share, each declared once here (its option and help above),
# each a RunConfig setting by its own name or renamed / negated below; its default is that setting's.
TRAINING: dict[str, Any] = {
    "rounds": Rounds,
    "head_init": HeadInit,
    "local_epochs": LocalEpochs,
    "learning_rate": LearningRate,
    "momentum": Momentum,
    "server_momentum": ServerMomentum,
    "distributed_noise": DistributedNoise,
    "statistics_share": StatisticsShare,
    "centering_share": CenteringShare,
    "ncm_logit_scale": NcmLogitScale,
    "stage_two_logit_scale": StageTwoLogitScale,
    "max_grad_norm": MaxGradNorm,
    "epsilon": Epsilon,
    "delta": Delta,
    "accountant": Accountant,
    "model": Model,
    "lora_r": LoraR,
    "lora_layers": LoraLayers,
    "lora_alpha": LoraAlpha,
    "lora_targets": LoraTargets,
    "max_length": MaxLength,
    "fraction_train": FractionTrain,
    "val_fraction": ValFraction,
    "no_dp": NoDp,
    "no_secagg": NoSecagg,
    "secagg_num_shares": SecaggNumShares,
    "secagg_reconstruction_threshold": SecaggReconstructionThreshold,
}
RENAMED = {"rounds": "num_server_rounds", "epsilon": "target_epsilon", "delta": "target_delta"}
SCHEDULE = ("rounds", "local_epochs", "learning_rate", "server_momentum")  # left out: shared.schedule
NEGATED = {"no_dp": "dp", "no_secagg": "secagg"}


def _default(name: str) -> Any:
    """An option's default: its setting's default, or None for the schedule's (``shared.schedule``)."""
    if name in SCHEDULE:
        return None
    if name in NEGATED:
        return False  # the setting is on by default; the option switches it off
    value = getattr(DEFAULTS, RENAMED.get(name, name))
    return ",".join(value) if isinstance(value, tuple) else value


def training_settings(values: dict[str, Any]) -> dict[str, Any]:
    """RunConfig keyword arguments from the training options' values; the schedule options left out
    follow epsilon, ``--no-dp`` and ``--distributed-noise`` (``shared.schedule.default_schedule``)."""
    settings: dict[str, Any] = {}
    for name, value in values.items():
        if name in NEGATED:
            settings[NEGATED[name]] = not value
        else:
            settings[RENAMED.get(name, name)] = module_names(value) if name == "lora_targets" else value
    schedule = default_schedule(dp=settings["dp"], distributed_noise=settings["distributed_noise"],
                                epsilon=settings["target_epsilon"], head_init=settings["head_init"],
                                centering_share=settings["centering_share"])
    for name, value in schedule.items():
        if settings[name] is None:
            settings[name] = value
    return settings


def with_training_options(command: Callable[..., None]) -> Callable[..., None]:
    """The command with every training option added to its signature (what Typer reads); it receives
    them as one ``training`` argument: RunConfig settings (``training_settings``)."""
    hints = typing.get_type_hints(command, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation))
           for p in inspect.signature(command).parameters.values() if p.name != "training"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=option, default=_default(name))
              for name, option in TRAINING.items()]

    @functools.wraps(command)
    def with_options(*args: Any, **kwargs: Any) -> None:
        values = {name: kwargs.pop(name) for name in TRAINING}
        return command(*args, **kwargs, training=training_settings(values))

    del with_options.__wrapped__  # Typer reads the signature below, not the command's own
    with_options.__signature__ = inspect.Signature(own + shared)  # type: ignore[attr-defined]
    with_options.__annotations__ = {p.name: p.annotation for p in own + shared}
    return with_options


def _policy_value(text: str) -> bool | int | float:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number or true/false") from None


def department_policies(budgets: list[str], policies: list[str], scopes: list[str] = ()) -> dict[str, dict[str, Any]]:
    """``--budget NAME=EPS``, ``--policy NAME:KEY=VALUE`` and ``--label-scope NAME=L1,L2`` as
    department -> {key: value}, the settings each department's own configuration would hold; every problem at once."""
    from client.label_scope import SCOPE_KEY
    from client.site_policy import POLICY_KEYS

    result: dict[str, dict[str, Any]] = {}
    problems = []
    for text in budgets:
        name, sep, value = text.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError("expected NAME=EPSILON")
            result.setdefault(name, {})["epsilon"] = float(value)
        except ValueError as exc:
            problems.append(f"--budget {text!r}: {exc}")
    for text in policies:
        name, sep, setting = text.partition(":")
        key, eq, value = setting.partition("=")
        try:
            if not (sep and eq and name):
                raise ValueError("expected NAME:KEY=VALUE")
            if key not in POLICY_KEYS:
                raise ValueError(f"unknown key {key!r}; known: {', '.join(POLICY_KEYS)}")
            result.setdefault(name, {})[key] = _policy_value(value)
        except ValueError as exc:
            problems.append(f"--policy {text!r}: {exc}")
    for text in scopes:
        name, sep, labels = text.partition("=")
        if not (sep and name and labels.strip(", ")):
            problems.append(f"--label-scope {text!r}: expected NAME=LABEL[,LABEL...]")
            continue
        result.setdefault(name, {})[SCOPE_KEY] = labels
    if problems:
        raise ConfigError(problems, source="department budgets and policies")
    return result
