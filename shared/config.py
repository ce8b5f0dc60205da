"""Run settings: read once from Flower's run config into a frozen, validated dataclass.

The keys are the kebab-case keys of ``[tool.flwr.app.config]`` in pyproject.toml.
Both the ServerApp and every ClientApp build a ``RunConfig`` from ``context.run_config``
and pass it down; nothing else reads the raw mapping.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import ConfigError

ACCOUNTANTS = ("rdp", "prv")
TRANSPORTS = ("simulation", "tls+node-auth", "insecure")
HEAD_INITS = ("class-statistics", "zeros")


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one federated run; invalid values raise ``ConfigError`` listing all of them."""

    # Stage 1 (``head-init = "class-statistics"``): round 1 releases the DP feature mean that features
    # are centred on (``shared.centering``; not with centering-share 0), the next round DP class
    # statistics; any further rounds fine-tune with DP-SGD from the head they build. The CLI's
    # default is ``default_rounds``.
    num_server_rounds: int = 2
    head_init: str = "class-statistics"  # "zeros": no stage 1, every round DP-SGD from a zero head
    centering_share: float = 0.05  # of stage 1's noise precision, for the feature mean; 0: no centring round
    statistics_share: float = 0.5  # of the run's epsilon, for stage 1 when DP-SGD rounds follow it (BENCHMARKS.md section 15)
    statistics_count_share: float = 0.1  # of stage 1's noise precision, for the noisy counts that weigh the rows
    # a class-sum row's weight: clip((noisy count - offset x count-noise deviation) / full-weight count, 0, 1)
    statistics_count_offset: float = 0.0
    statistics_full_weight_count: float = 100.0
    # The nearest-class-mean head's logits are this times the cosine to each class mean: where stage 1
    # is the whole run, ncm-logit-scale (30: the validation loss is lowest at 25-30 in most cases, so
    # its probabilities are calibrated); where DP-SGD rounds follow, stage-two-logit-scale (15: a less
    # confident start leaves DP-SGD more gradient per record to work with; BENCHMARKS.md section 15)
    ncm_logit_scale: float = 30.0
    stage_two_logit_scale: float = 15.0
    # Distributed noise: each consenting department adds only its share of the noise, so the SecAgg+
    # sum carries one release's worth, in stage 1 and in DP-SGD rounds of one step each
    # (client.site_policy, distributed-noise; client.dp_training.train_private)
    distributed_noise: bool = False
    local_epochs: int = 1
    batch_size: int = 256  # expected logical batch under Poisson sampling
    learning_rate: float = 2.5
    momentum: float = 0.9
    # The server's momentum over DP-SGD rounds (FedAvgM): the model moves by v = this x v + the round's
    # average delta. Post-processing of the aggregates: no privacy cost. 0: plain FedAvg.
    server_momentum: float = 0.5
    max_grad_norm: float = 1.0  # per-sample clipping bound C
    target_epsilon: float = 8.0  # per-department budget over the whole run
    target_delta: float = 1e-5
    dp: bool = True  # False only for baselines: then no privacy guarantee holds
    accountant: str = "prv"  # Opacus PRV upper bound; "rdp" is looser
    model: str = "minilm"  # "minilm", "tiny" or a local Hugging Face model folder
    lora_r: int = 0  # 0: train the classification head only, on frozen features
    lora_alpha: int = 16
    # > 0 (with lora-r > 0): adapters only in the top lora-layers layers, trained on cached states of
    # the layers below (shared.top_layers); 0: adapters in every layer, full forward passes
    lora_layers: int = 0
    lora_targets: tuple[str, ...] = ("query", "value")
    max_length: int = 64
    labels: tuple[str, ...] = ()
    fraction_train: float = 1.0
    min_departments: int = 2
    val_fraction: float = 0.1
    test_fraction: float = 0.1  # per-department test split; 0 when the server holds a test set
    seed: int = 0
    out_dir: str = "fedpriv-runs/latest"
    run_uid: str = ""  # fedpriv's name for the run, kept by a resume (Flower's run id is not); empty: Flower's
    resume_after_round: int = 0  # continue from this round's checkpoint in out-dir; 0: a fresh run
    secagg: bool = True  # Flower SecAgg+: the server learns only the (weighted) sum of updates
    secagg_clipping_range: float = 8.0  # updates are sent as deltas; values beyond +-this are clipped
    secagg_quantization_range: int = 2**22
    secagg_max_weight: int = 100_000  # largest num-examples a department may weight its update with
    secagg_timeout_s: float = 600.0  # a department that has not answered a stage by then is dropped
    # The share of a department's SecAgg+ neighbours whose key shares unmask the sum: the round goes on
    # while this many remain. Higher tolerates fewer dropouts, and lets distributed noise be calibrated
    # for a larger smallest aggregate (smaller shares, less noise in the sum: BENCHMARKS.md section 18).
    # Above 1/2, so that the server cannot recover both masks of one department.
    secagg_reconstruction_threshold: float = 0.6
    # SecAgg+ neighbourhood: 0 = every department shares masks and key shares with every other (full
    # mesh, the strongest); an odd k >= 3: with k - 1 random neighbours per round (cost grows ~N k^2, not N^3)
    secagg_num_shares: int = 0
    transport: str = "simulation"  # how departments reach the server, as the launcher set it up (for the record)
    audit_updates: bool = False  # save raw deltas (department side) and masked inputs (server side)
    partition_dir: str = ""  # simulation only: folder with manifest.json and department files
    test_data: str = ""  # CSV/JSONL for server-side evaluation; empty: federated evaluation
    # deployment: JSON {department: OpenSSH public key} from provisioning; replies must be signed by
    # their department's key (shared.reply_signature). Empty: names are not checked (simulation)
    department_keys: str = ""
    feature_cache: str = ""  # simulation only: one embedding cache for all departments and the server; empty: per folder

    def __post_init__(self) -> None:
        problems = _validate(self)
        if problems:
            raise ConfigError(problems, source="run configuration")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's ``context.run_config`` (kebab-case keys, scalar values)."""
        known = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        problems: list[str] = []
        for key, raw in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                problems.append(f"unknown setting '{key}'")
                continue
            try:
                values[name] = _coerce(name, known[name], raw)
            except ValueError as exc:
                problems.append(f"'{key}': {exc}")
        if problems:
            raise ConfigError(problems, source="run configuration")
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """The inverse of ``from_run_config``: a flat mapping with kebab-case keys."""
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "labels":
                value = json.dumps(list(value))
            elif isinstance(value, tuple):
                value = ",".join(value)
            flat[f.name.replace("_", "-")] = value
        return flat

    @property
    def label_fingerprint(self) -> str:
        """Short hash of the ordered label set; server and departments must agree on it."""
        return hashlib.sha256(json.dumps(list(self.labels)).encode()).hexdigest()[:16]

    @property
    def head_only(self) -> bool:
        return self.lora_r == 0

    @property
    def centering_round(self) -> int:
        """The round in which departments release the feature mean that features are centred on; 0: none."""
        return 1 if self.head_init == "class-statistics" and self.centering_share > 0 else 0

    @property
    def statistics_round(self) -> int:
        """The round in which departments release class statistics; 0: none."""
        return self.centering_round + 1 if self.head_init == "class-statistics" else 0

    @property
    def dp_sgd_rounds(self) -> int:
        return self.num_server_rounds - self.statistics_round

    @property
    def statistics_logit_scale(self) -> float:
        """The logit scale of the head stage 1 builds: calibrated if it is final, lower if DP-SGD starts from it."""
        return self.stage_two_logit_scale if self.dp_sgd_rounds > 0 else self.ncm_logit_scale

    @property
    def statistics_scale(self) -> float:
        """Public bound that brings a class sum or count (at most secagg-max-weight records) into SecAgg+'s range."""
        return self.secagg_max_weight / self.secagg_clipping_range

    @property
    def feature_mean_scale(self) -> float:
        """The same for the feature mean, whose record count is secagg-max-weight for the largest department
        (simulations set it so): into half the range, so that its noise is not clipped."""
        return 2 * self.statistics_scale


def _coerce(name: str, kind: Any, raw: Any) -> Any:
    """A run config value (TOML scalars; lists travel as text) as the setting's declared type."""
    if name == "labels":
        if raw in ("", None):
            return ()
        if isinstance(raw, str):
            try:
                parsed = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"expected a JSON list of label names, got {raw[:60]!r}") from exc
        else:
            parsed = raw
        if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
            raise ValueError("expected a JSON list of label names")
        return tuple(parsed)
    if kind == tuple[str, ...]:
        if not isinstance(raw, str):
            raise ValueError(f"expected a comma-separated string, got {raw!r}")
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        raise ValueError(f"expected true or false, got {raw!r}")
    if kind is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"expected an integer, got {raw!r}")
        return raw
    if kind is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ValueError(f"expected a number, got {raw!r}")
        return float(raw)
    if not isinstance(raw, str):
        raise ValueError(f"expected a string, got {raw!r}")
    return raw


def secagg_neighbourhood(num_shares: int) -> str:
    """Whom each department shares SecAgg+ masks with under ``secagg-num-shares``, in words."""
    return f"{num_shares - 1} random neighbours per department" if num_shares else "every department with every other"


def _validate(cfg: RunConfig) -> list[str]:
    problems: list[str] = []

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    for f in dataclasses.fields(cfg):  # NaN passes every comparison below unnoticed; infinity most of them
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{f.name.replace('_', '-')} must be a finite number (got {value})")
    need(cfg.num_server_rounds >= 1, f"num-server-rounds must be >= 1 (got {cfg.num_server_rounds})")
    need(cfg.head_init in HEAD_INITS, f"head-init must be one of {HEAD_INITS} (got {cfg.head_init!r})")
    need(cfg.num_server_rounds >= cfg.statistics_round,
         f"num-server-rounds must be >= {cfg.statistics_round} (got {cfg.num_server_rounds}): stage 1 is round "
         f"{cfg.statistics_round}" + (" after the feature mean (centering-share 0: no feature-mean round)"
                                      if cfg.centering_round else ""))
    need(0 <= cfg.centering_share < 1, f"centering-share must be in [0, 1) (got {cfg.centering_share})")
    need(0 < cfg.statistics_share <= 1, f"statistics-share must be in (0, 1] (got {cfg.statistics_share})")
    need(0 < cfg.statistics_count_share < 1,
         f"statistics-count-share must be in (0, 1) (got {cfg.statistics_count_share})")
    need(cfg.statistics_count_offset >= 0, f"statistics-count-offset must be >= 0 (got {cfg.statistics_count_offset})")
    need(cfg.statistics_full_weight_count > 0,
         f"statistics-full-weight-count must be > 0 (got {cfg.statistics_full_weight_count})")
    need(cfg.secagg or not cfg.distributed_noise, "distributed-noise needs SecAgg+ (a noise share alone protects nothing)")
    need(cfg.ncm_logit_scale > 0, f"ncm-logit-scale must be > 0 (got {cfg.ncm_logit_scale})")
    need(cfg.stage_two_logit_scale > 0, f"stage-two-logit-scale must be > 0 (got {cfg.stage_two_logit_scale})")
    need(cfg.local_epochs >= 1, f"local-epochs must be >= 1 (got {cfg.local_epochs})")
    need(cfg.batch_size >= 1, f"batch-size must be >= 1 (got {cfg.batch_size})")
    need(cfg.learning_rate > 0, f"learning-rate must be > 0 (got {cfg.learning_rate})")
    need(0 <= cfg.momentum < 1, f"momentum must be in [0, 1) (got {cfg.momentum})")
    need(0 <= cfg.server_momentum < 1, f"server-momentum must be in [0, 1) (got {cfg.server_momentum})")
    need(cfg.max_grad_norm > 0, f"max-grad-norm must be > 0 (got {cfg.max_grad_norm})")
    need(cfg.target_epsilon > 0, f"target-epsilon must be > 0 (got {cfg.target_epsilon})")
    need(0 < cfg.target_delta < 1, f"target-delta must be in (0, 1) (got {cfg.target_delta})")
    need(cfg.accountant in ACCOUNTANTS, f"accountant must be one of {ACCOUNTANTS} (got {cfg.accountant!r})")
    need(bool(cfg.model), "model must name 'minilm', 'tiny' or a local model folder")
    need(cfg.lora_r >= 0, f"lora-r must be >= 0 (got {cfg.lora_r}); 0 trains the head only")
    need(cfg.lora_layers >= 0, f"lora-layers must be >= 0 (got {cfg.lora_layers})")
    need(cfg.lora_layers == 0 or cfg.lora_r > 0, "lora-layers > 0 needs lora-r > 0 (the rank of those adapters)")
    need(cfg.lora_alpha >= 1, f"lora-alpha must be >= 1 (got {cfg.lora_alpha})")
    need(cfg.lora_r == 0 or bool(cfg.lora_targets), "lora-targets must name at least one module when lora-r > 0")
    need(8 <= cfg.max_length <= 512, f"max-length must be in [8, 512] (got {cfg.max_length})")
    need(len(set(cfg.labels)) == len(cfg.labels), "labels contain duplicates")
    need(0 < cfg.fraction_train <= 1, f"fraction-train must be in (0, 1] (got {cfg.fraction_train})")
    need(cfg.min_departments >= 1, f"min-departments must be >= 1 (got {cfg.min_departments})")
    need(0 < cfg.val_fraction < 0.5, f"val-fraction must be in (0, 0.5) (got {cfg.val_fraction})")
    need(0 <= cfg.test_fraction < 0.5, f"test-fraction must be in [0, 0.5) (got {cfg.test_fraction})")
    need(bool(cfg.out_dir), "out-dir must not be empty")
    need(0 <= cfg.resume_after_round < cfg.num_server_rounds,
         f"resume-after-round must be in [0, num-server-rounds) (got {cfg.resume_after_round})")
    need(cfg.secagg_clipping_range > 0, f"secagg-clipping-range must be > 0 (got {cfg.secagg_clipping_range})")
    need(2**8 <= cfg.secagg_quantization_range <= 2**24,
         f"secagg-quantization-range must be in [2^8, 2^24] (got {cfg.secagg_quantization_range})")
    need(cfg.secagg_max_weight >= 1, f"secagg-max-weight must be >= 1 (got {cfg.secagg_max_weight})")
    need(cfg.transport in TRANSPORTS, f"transport must be one of {TRANSPORTS} (got {cfg.transport!r})")
    need(cfg.secagg_timeout_s > 0, f"secagg-timeout-s must be > 0 (got {cfg.secagg_timeout_s})")
    need(0.5 < cfg.secagg_reconstruction_threshold <= 1,
         f"secagg-reconstruction-threshold must be in (0.5, 1] (got {cfg.secagg_reconstruction_threshold})")
    need(cfg.secagg_num_shares == 0 or (cfg.secagg_num_shares >= 3 and cfg.secagg_num_shares % 2 == 1),
         f"secagg-num-shares must be 0 (every department) or an odd number >= 3 (got {cfg.secagg_num_shares})")
    return problems


DEFAULTS = RunConfig()
