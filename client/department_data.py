"""Which department a ClientApp serves, where its data and state live, and its prepared splits.

Two ways a department is described, both ending in ``DepartmentSettings``:
- deployment: the SuperNode's ``--node-config`` gives ``department``, ``data-path`` and
  ``state-dir`` (and optionally its own ``epsilon`` / ``delta``, which may only lower the run's,
  its site policy and its ``label-scope``);
- simulation: ``partition-dir`` in the run config holds ``manifest.json`` written by
  ``fedpriv simulate`` (with each department's budget and policy); the node's ``partition-id``
  picks the department, and its state lives under ``<out-dir>/departments/<name>``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.label_scope import SCOPE_KEY, parse_label_scope
from client.privacy import MIN_TRAIN_RECORDS
from client.site_policy import SitePolicy
from shared.config import RunConfig
from shared.data import DEFAULT_COLUMNS, Columns, Record, check_department_names, check_labels, load_records, safe_name
from shared.errors import ConfigError, DataError
from shared.partition import split_department

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DepartmentSettings:
    name: str
    data_path: Path
    state_dir: Path
    policy: SitePolicy
    label_scope: tuple[str, ...] | None = None  # the labels it declares (client.label_scope); None: all
    shared_feature_cache: Path | None = None  # simulation's --feature-cache; else its own state folder
    signing_key: Path | None = None  # deployment: the kit's private key, which signs every reply
    columns: Columns = DEFAULT_COLUMNS  # the names of its file's text and label columns (department: ignored)

    @property
    def feature_cache(self) -> Path:
        return self.shared_feature_cache or self.state_dir / "feature-cache"


@dataclass(frozen=True)
class DepartmentData:
    name: str
    train: list[Record]
    val: list[Record]
    test: list[Record]


def resolve_department(config: RunConfig, node_config: Mapping[str, Any]) -> DepartmentSettings:
    if "department" in node_config:
        missing = [k for k in ("data-path", "state-dir") if not node_config.get(k)]
        if missing:
            raise ConfigError([f"node config lacks '{k}'" for k in missing], source="department node config")
        name = str(node_config["department"])
        data_path, state_dir = Path(str(node_config["data-path"])), Path(str(node_config["state-dir"]))
        own_policy: Mapping[str, Any] = node_config
    elif config.partition_dir:
        manifest_path = Path(config.partition_dir) / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{manifest_path}: cannot read the simulation manifest ({exc})") from None
        index = int(node_config.get("partition-id", -1))
        departments = manifest["departments"]
        if not 0 <= index < len(departments):
            raise ConfigError(
                f"partition-id {index} has no department ({len(departments)} in {manifest_path}); "
                "num-supernodes must equal the number of departments"
            )
        entry = departments[index]
        name, data_path = entry["name"], Path(config.partition_dir) / entry["file"]
        state_dir = Path(config.out_dir) / "departments" / safe_name(name)
        own_policy = entry.get("policy", {})
    else:
        raise ConfigError(
            "this node is no department: give the SuperNode --node-config \"department=... data-path=... "
            "state-dir=...\" (deployment) or set partition-dir (simulation)"
        )
    check_department_names([name], source="department node config" if "department" in node_config else str(config.partition_dir))
    policy = SitePolicy.from_mapping(own_policy, department=name, run=config)
    scope = parse_label_scope(own_policy.get(SCOPE_KEY), department=name, labels=config.labels)
    # Only a simulation shares a cache: a deployed department's paths are its own, never the server's to set.
    shared_cache = Path(config.feature_cache) if config.feature_cache and "department" not in node_config else None
    signing_key = Path(str(node_config["signing-key"])) if node_config.get("signing-key") else None
    columns = Columns(str(node_config.get("text-column", "text")), str(node_config.get("label-column", "label")), None)
    return DepartmentSettings(name, data_path, state_dir, policy, scope, shared_cache, signing_key, columns)


def load_department(settings: DepartmentSettings, config: RunConfig) -> DepartmentData:
    """Read, check and split a department's records; fail naming the department and file."""
    records = load_records(settings.data_path, columns=settings.columns)
    if config.labels:
        check_labels(records, config.labels)
    if settings.label_scope:
        check_labels(records, settings.label_scope, described_as=f"department {settings.name}'s label-scope")
    split = split_department(
        records, val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=config.seed
    )
    if len(split.train) < MIN_TRAIN_RECORDS or not split.val:
        raise DataError(
            f"department {settings.name} ({settings.data_path}): {len(split.train)} training records, "
            f"{len(split.val)} validation; needs at least {MIN_TRAIN_RECORDS} for training and 1 for validation"
        )
    return DepartmentData(settings.name, split.train, split.val, split.test)
