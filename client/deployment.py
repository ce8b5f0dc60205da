"""Starting a department's SuperNode from its kit: TLS to the SuperLink, authenticated by its key.

`fedpriv department start --kit OUT/finance --data finance.csv` runs ``flower-supernode`` with the
kit's CA certificate and private key, and tells the ClientApp (through ``--node-config``) which
department it is, where its records are and where its privacy ledger lives. A refused node (no
or wrong CA, unregistered key) stops after a bounded number of retries with a non-zero status.
The department's own budget and site policy come from the ``[policy]`` table of its
``department.toml`` (keys of ``client.site_policy``), ``--epsilon`` overriding its budget, and its
declared ``label-scope`` (``client.label_scope``) from the top level.
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

from client.label_scope import SCOPE_KEY
from client.site_policy import POLICY_KEYS
from shared.flower_env import check_kit, environment, executable, flwr_home, free_port
from shared.data import load_records
from shared.errors import ConfigError

DEPARTMENT_KIT_FILES = ("ca.crt", "node.key", "department.toml")
MAX_RETRIES = 3
MAX_WAIT_S = 30


def read_kit(kit: Path, *, insecure: bool) -> dict:
    check_kit(kit, ("department.toml",) if insecure else DEPARTMENT_KIT_FILES)
    try:
        settings = tomllib.loads((kit / "department.toml").read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{kit / 'department.toml'}: {exc}") from None
    missing = [k for k in ("department", "superlink") if k not in settings]
    if missing:
        raise ConfigError([f"{kit / 'department.toml'} lacks '{k}'" for k in missing], source="kit")
    return settings


def supernode_command(
    kit: Path, *, data: Path, superlink: str | None, state_dir: Path | None, insecure: bool, epsilon: float | None
) -> tuple[list[str], dict[str, str]]:
    settings = read_kit(kit, insecure=insecure)
    name = settings["department"]
    load_records(data)  # a broken data file is reported here, before the node joins
    state = (state_dir or kit / "state").resolve()
    state.mkdir(parents=True, exist_ok=True)
    node_config = f'department="{name}" data-path="{data.resolve()}" state-dir="{state}"'
    policy = dict(settings.get("policy", {}))
    if "epsilon" in settings:
        policy.setdefault("epsilon", settings["epsilon"])
    if epsilon is not None:
        policy["epsilon"] = epsilon
    unknown = sorted(set(policy) - set(POLICY_KEYS))
    if unknown:
        raise ConfigError(f"{kit / 'department.toml'}: unknown [policy] keys {unknown}; known: {', '.join(POLICY_KEYS)}")
    for key, value in policy.items():
        node_config += f" {key}={str(value).lower() if isinstance(value, bool) else value}"
    if SCOPE_KEY in settings:
        scope = settings[SCOPE_KEY]
        labels = scope if isinstance(scope, list) else str(scope).split(",")
        node_config += f' {SCOPE_KEY}="{",".join(str(label).strip() for label in labels)}"'
    address = superlink or settings["superlink"]
    command = [executable("flower-supernode"), "--superlink", address, "--node-config", node_config,
               "--port", str(free_port()), "--max-retries", str(MAX_RETRIES), "--max-wait-time", str(MAX_WAIT_S)]
    if insecure:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(kit / "ca.crt"), "--auth-supernode-private-key", str(kit / "node.key")]
    return command, environment(flwr_home(kit, address, ca=None if insecure else kit / "ca.crt"))


def start_department(
    kit: Path, *, data: Path, superlink: str | None, state_dir: Path | None, insecure: bool,
    epsilon: float | None, log: Path | None = None,
) -> subprocess.Popen:
    command, env = supernode_command(kit, data=data, superlink=superlink, state_dir=state_dir,
                                     insecure=insecure, epsilon=epsilon)
    out = log.open("a") if log else None
    return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                            start_new_session=True)
