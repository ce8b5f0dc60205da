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

import re
import socket
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from client.approved_code import KIT_KEY as APPROVED_KEY
from client.approved_code import UnapprovedCode, fab_sha256
from client.label_scope import SCOPE_KEY
from client.site_policy import POLICY_KEYS, SitePolicy
from shared.config import RunConfig
from shared.data import DEFAULT_COLUMNS, Columns, load_records
from shared.errors import ConfigError
from simulation.deploy.processes import check_kit, environment, flwr_home, free_port

DEPARTMENT_KIT_FILES = ("ca.crt", "node.key", "department.toml")
# A department's SuperNode rides out a network outage or a server restart of up to an hour (it
# reconnects by itself); a kit that cannot work at all (another CA) is refused before it starts.
MAX_WAIT_S = 3600
NODE_CONFIG_FILE = "node-config.toml"  # in the state folder: what the ClientApp reads as its node config


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


def department_own_settings(kit: Path, settings: dict, *, epsilon: float | None) -> dict:
    """The department's budget, site policy and label scope from its kit (``--epsilon`` overrides the
    kit's budget), validated: what its ClientApp enforces, whatever the server asks."""
    name = settings["department"]
    policy = dict(settings.get("policy", {}))
    if "epsilon" in settings:
        policy.setdefault("epsilon", settings["epsilon"])
    if epsilon is not None:
        policy["epsilon"] = epsilon
    unknown = sorted(set(policy) - set(POLICY_KEYS))
    if unknown:
        raise ConfigError(f"{kit / 'department.toml'}: unknown [policy] keys {unknown}; known: {', '.join(POLICY_KEYS)}")
    # A mistaken budget or policy (NaN, a negative epsilon) is refused now, not at the first round.
    SitePolicy.from_mapping(policy, department=name, run=RunConfig(target_epsilon=1e9, target_delta=0.5))
    if SCOPE_KEY in settings:
        scope = settings[SCOPE_KEY]
        labels = scope if isinstance(scope, list) else str(scope).split(",")
        policy[SCOPE_KEY] = ",".join(str(label).strip() for label in labels)
    return policy


def supernode_command(
    kit: Path, *, data: Path, superlink: str | None, state_dir: Path | None, insecure: bool, epsilon: float | None,
    columns: Columns = DEFAULT_COLUMNS,
) -> tuple[list[str], dict[str, str]]:
    settings = read_kit(kit, insecure=insecure)
    name = settings["department"]
    load_records(data, columns=columns.without_department())  # a broken data file is reported here, before the node joins
    state = (state_dir or kit / "state").resolve()
    node_config: dict[str, Any] = {"department": name, "data-path": str(data.resolve()), "state-dir": str(state),
                                   "text-column": columns.text, "label-column": columns.label}
    if not insecure:  # the ClientApp signs every reply with the kit's key (shared.reply_signature)
        node_config["signing-key"] = str((kit / "node.key").resolve())
    own = department_own_settings(kit, settings, epsilon=epsilon)
    refuse_a_spent_budget(name, state=state, budget=own.get("epsilon"), kit=kit)
    node_config.update(own)
    address = superlink or settings["superlink"]
    if insecure and speaks_tls(address):
        raise ConfigError(f"--insecure: the SuperLink at {address} speaks TLS, so a plain connection cannot reach it "
                          "(Flower would only say 'Failed to initialize the connection'); start without --insecure")
    if not insecure and (problem := certificate_problem(address, ca=kit / "ca.crt")):
        raise ConfigError(f"the SuperLink at {address} presents a certificate that {kit / 'ca.crt'} does not verify "
                          f"(CERTIFICATE_VERIFY_FAILED: {problem}): this kit is from another provisioning, or "
                          "--superlink names another server")
    approved = settings.get(APPROVED_KEY, [])
    if not isinstance(approved, list) or not approved or not all(isinstance(h, str) and len(h) == 64 for h in approved):
        raise ConfigError(f"{kit / 'department.toml'}: '{APPROVED_KEY}' must list the SHA-256 of the app code (FAB) "
                          "this department approved; `fedpriv department approve --kit KIT --app DIR` adds one")
    state.mkdir(parents=True, exist_ok=True)  # only once every setting has been validated
    node_config_file = state / NODE_CONFIG_FILE  # Flower reads a --node-config that names a .toml file
    node_config_file.write_text(tomli_w.dumps(node_config))
    pin = [arg for digest in approved for arg in ("--approved-fab-sha256", digest)]
    # Not flower-supernode itself: the same SuperNode, started so that it runs only approved FABs.
    command = [sys.executable, "-m", "client.department_supernode", *pin, "--superlink", address, "--node-config", str(node_config_file),
               "--port", str(free_port()), "--max-wait-time", str(MAX_WAIT_S)]
    if insecure:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(kit / "ca.crt"), "--auth-supernode-private-key", str(kit / "node.key")]
    return command, environment(flwr_home(kit, address, ca=None if insecure else kit / "ca.crt"))


def refuse_a_spent_budget(name: str, *, state: Path, budget: float | None, kit: Path) -> None:
    """A department whose own budget its ledger has already spent would decline every round: say so
    now, with what to do, instead of joining runs that wait for it and then fail. The ledger is read
    (and checked: a broken one is refused here, naming the line) only where it exists."""
    from client.privacy import EPSILON_TOLERANCE, LEDGER_FILE, PrivacyLedger

    if budget is None or not (state / LEDGER_FILE).exists():
        return
    ledger = PrivacyLedger(state, department=name)
    spent = ledger.entries[-1].epsilon if ledger.entries else 0.0
    if spent >= float(budget) - EPSILON_TOLERANCE:
        raise ConfigError(
            f"department {name}: its budget epsilon={budget} is spent (epsilon {spent:.3f} in earlier runs, "
            f"{state / LEDGER_FILE}), so it would decline every round. Its records have been released at that "
            f"epsilon for good: to train more, raise its budget knowingly (--epsilon, or 'epsilon' in "
            f"{kit / 'department.toml'}; the total grows past the old one), or train on new records with a new state folder")


def certificate_problem(address: str, *, ca: Path, timeout_s: float = 5.0) -> str | None:
    """Why the TLS server at ``address`` fails verification against ``ca``; None when it passes or
    when nothing answers (the SuperNode then waits for the SuperLink to come up)."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=host.strip("[]")):
                return None
    except ssl.SSLCertVerificationError as exc:
        return exc.verify_message or str(exc)
    except (OSError, ValueError):  # unreachable, or not TLS: Flower reports what follows
        return None


def speaks_tls(address: str, *, timeout_s: float = 5.0) -> bool:
    """Whether a TLS handshake with ``address`` (host:port) succeeds; False when nothing answers."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only the protocol is probed here; Flower verifies the certificate
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=host.strip("[]") or None):
                return True
    except (OSError, ValueError):  # ssl.SSLError is an OSError: a plain server, or none
        return False


def distributed_noise_statement(kit: Path, *, epsilon: float | None) -> str | None:
    """What a department whose kit consents to distributed noise trusts, in words; None without consent."""
    settings = read_kit(kit, insecure=True)
    own = {key: value for key, value in department_own_settings(kit, settings, epsilon=epsilon).items() if key != SCOPE_KEY}
    policy = SitePolicy.from_mapping(own, department=settings["department"], run=RunConfig(target_epsilon=1e9, target_delta=0.5))
    if not policy.distributed_noise:
        return None
    shares = int(policy.min_departments or 1)
    return (f"distributed noise: department {settings['department']} adds 1/sqrt({shares}) of each release's noise and "
            f"trusts SecAgg+ and at least {shares - 1} other department(s) to add the rest; should its share ever be "
            "unmasked alone (a server that makes the others decline), only the weaker own epsilon of its ledger holds")


def start_department(
    kit: Path, *, data: Path, superlink: str | None, state_dir: Path | None, insecure: bool,
    epsilon: float | None, log: Path | None = None, columns: Columns = DEFAULT_COLUMNS,
) -> subprocess.Popen:
    command, env = supernode_command(kit, data=data, superlink=superlink, state_dir=state_dir,
                                     insecure=insecure, epsilon=epsilon, columns=columns)
    out = log.open("a") if log else None
    return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                            start_new_session=True)


def approve(kit: Path, *, app: Path | None, sha256: str | None) -> str:
    """Add the FAB of ``app`` (or a given SHA-256) to the kit's approved app code; return the hash."""
    settings = read_kit(kit, insecure=True)
    if (app is None) == (sha256 is None):
        raise ConfigError("give exactly one of --app DIR (the reviewed code) or --sha256 HASH", source="approve")
    digest = fab_sha256(app) if app is not None else str(sha256).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise UnapprovedCode(f"--sha256 {sha256}: not a SHA-256 (64 hex digits)")
    approved = list(settings.get(APPROVED_KEY, []))
    if digest not in approved:
        approved.append(digest)
    path = kit / "department.toml"
    line = tomli_w.dumps({APPROVED_KEY: approved}).strip()
    text = path.read_text()
    pattern = re.compile(rf"^{re.escape(APPROVED_KEY)}\s*=\s*\[[^\]]*\]", re.MULTILINE)  # the whole list, one line or many
    if pattern.search(text):
        text = pattern.sub(line, text, count=1)
    else:  # top-level keys come before any [table]
        text = re.sub(r"^(superlink\s*=.*)$", lambda m: m.group(1) + "\n" + line, text, count=1, flags=re.MULTILINE)
    path.write_text(text)
    return digest
