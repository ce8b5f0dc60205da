"""`fedpriv provision`: certificate chains verify, SANs are present, private keys are 0600 and stay in their kit."""

from __future__ import annotations

import json
import stat
from contextlib import contextmanager

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.errors import ConfigError
from simulation.deploy.provisioning import provision

DEPARTMENTS = ["finance", "hr", "it"]
APPROVED = "ab" * 32


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    return provision(tmp_path_factory.mktemp("kits") / "out", departments=DEPARTMENTS,
                     hosts=["fl.example.com", "127.0.0.1"], superlink="fl.example.com:9093",
                     approved_fab_sha256=APPROVED)


def load_cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_server_certificate_chains_to_the_ca_and_names_its_hosts(kits):
    ca = load_cert(kits.server_kit / "ca.crt")
    server = load_cert(kits.server_kit / "server.pem")
    server.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.com"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    key = serialization.load_pem_private_key((kits.server_kit / "server.key").read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_department_kits_hold_their_own_key_only(kits):
    registered = json.loads((kits.server_kit / "departments.json").read_text())["departments"]
    assert sorted(registered) == DEPARTMENTS
    for name, kit in kits.department_kits.items():
        assert sorted(p.name for p in kit.iterdir()) == ["ca.crt", "department.toml", "node.key", "node.pub"]
        assert (kit / "ca.crt").read_bytes() == (kits.server_kit / "ca.crt").read_bytes()
        private = serialization.load_ssh_private_key((kit / "node.key").read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        assert public.decode() == registered[name] == (kits.server_kit / "keys" / f"{name}.pub").read_text().strip()
        assert f'department = "{name}"' in (kit / "department.toml").read_text()
    every_file = [p for p in kits.root.rglob("*") if p.is_file()]
    node_keys = [p for p in every_file if p.name == "node.key"]
    assert len(node_keys) == len(DEPARTMENTS)  # each private key exists exactly once, in its kit


def test_private_keys_are_0600(kits):
    for path in [kits.root / "ca" / "ca.key", kits.server_kit / "server.key",
                 *(kit / "node.key" for kit in kits.department_kits.values())]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_bad_requests_are_refused(tmp_path, kits):
    with pytest.raises(ConfigError) as info:
        provision(tmp_path / "x", departments=["Finance Dept", "hr", "hr"], hosts=[], superlink="h:1", approved_fab_sha256=APPROVED)
    message = str(info.value)
    assert "'Finance Dept'" in message and "repeat" in message and "--hosts" in message
    with pytest.raises(ConfigError, match="never overwrites keys"):
        provision(kits.root, departments=["ops"], hosts=["h"], superlink="h:1", approved_fab_sha256=APPROVED)


def test_department_start_names_a_missing_kit_file(tmp_path, kits):
    from typer.testing import CliRunner

    from simulation.cli.main import app

    broken = tmp_path / "finance"
    broken.mkdir()
    for name in ("ca.crt", "department.toml"):
        (broken / name).write_bytes((kits.department_kits["finance"] / name).read_bytes())
    data = tmp_path / "finance.csv"
    data.write_text("text,label\nhello,a\n")
    result = CliRunner().invoke(app, ["department", "start", "--kit", str(broken), "--data", str(data)])
    assert result.exit_code == 1 and f"kit {broken} lacks node.key" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def _reissue_server_certificate(kits, *, hosts, days_valid):
    """Re-sign the server certificate with the kit's own CA: other names, or already expired."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes

    ca_key = serialization.load_pem_private_key((kits.root / "ca" / "ca.key").read_bytes(), password=None)
    ca = load_cert(kits.server_kit / "ca.crt")
    old = load_cert(kits.server_kit / "server.pem")
    now = dt.datetime.now(dt.timezone.utc)
    sans = [x509.DNSName(h) for h in hosts]
    cert = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(ca.subject).public_key(old.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=30)).not_valid_after(now + dt.timedelta(days=days_valid))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (kits.server_kit / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize(("hosts", "days", "reason"), [
    (["127.0.0.1.nip.example"], 30, "certificate is refused for it"),
    (["localhost"], -1, "certificate has expired"),
])
def test_server_start_refuses_a_mismatched_or_expired_certificate(tmp_path, hosts, days, reason):
    import socket

    from shared.errors import FedprivError
    from simulation.deploy.superlink import start_superlink

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kits = provision(tmp_path / "kits", departments=["hr"], hosts=["localhost"], superlink=f"localhost:{port}",
                     approved_fab_sha256=APPROVED)
    _reissue_server_certificate(kits, hosts=hosts, days_valid=days)
    with pytest.raises(FedprivError, match=reason):
        start_superlink(kits.server_kit, host="127.0.0.1", port=port, insecure=False, log=tmp_path / "superlink.log")


def test_a_kits_budget_policy_and_label_scope_reach_the_department(tmp_path, kits):
    from flwr.common.config import parse_config_args

    from client.department_data import resolve_department
    from shared.config import RunConfig
    from simulation.deploy.supernode import supernode_command

    kit = tmp_path / "hr"
    kit.mkdir()
    for name in ("ca.crt", "node.key"):
        (kit / name).write_bytes((kits.department_kits["hr"] / name).read_bytes())
    (kit / "department.toml").write_text(
        f'department = "hr"\nsuperlink = "fl.example.com:9093"\nepsilon = 4.0\nlabel-scope = ["leave", "payroll"]\n'
        f'approved-fab-sha256 = ["{APPROVED}"]\n'
        "[policy]\nrequire-secagg = true\n")
    data = tmp_path / "hr.csv"
    data.write_text("text,label\nmy leave request,leave\n")
    command, _ = supernode_command(kit, data=data, superlink=None, state_dir=None, insecure=False, epsilon=None)
    node_config = parse_config_args([command[command.index("--node-config") + 1]])
    settings = resolve_department(RunConfig(labels=("leave", "payroll", "vpn")), node_config)
    assert settings.name == "hr" and settings.label_scope == ("leave", "payroll")
    assert settings.policy.budget == 4.0 and settings.policy.require_secagg is True


def test_a_department_that_consents_to_distributed_noise_is_told_what_it_trusts(tmp_path, kits):
    from simulation.deploy.supernode import distributed_noise_statement

    kit = tmp_path / "hr"
    kit.mkdir()
    toml = 'department = "hr"\nsuperlink = "fl.example.com:9093"\nlabel-scope = ["leave"]\n'
    (kit / "department.toml").write_text(toml + "[policy]\nrequire-secagg = true\n")
    assert distributed_noise_statement(kit, epsilon=None) is None
    (kit / "department.toml").write_text(toml + "[policy]\ndistributed-noise = true\nmin-departments = 4\n")
    said = distributed_noise_statement(kit, epsilon=None)
    assert said is not None and "1/sqrt(4)" in said and "at least 3 other" in said and "own epsilon" in said


def test_a_department_runs_only_the_app_code_it_approved(tmp_path, kits):
    from types import SimpleNamespace

    from client.approved_code import UnapprovedCode, approved_only, fab_sha256, install_approval
    from simulation.deploy.launcher import app_dir
    from simulation.deploy.supernode import approve, supernode_command

    # the kit pins a hash, and the SuperNode is started through the pin
    data = tmp_path / "hr.csv"
    data.write_text("text,label\nmy leave request,leave\n")
    command, _ = supernode_command(kits.department_kits["hr"], data=data, superlink=None, state_dir=tmp_path / "s",
                                   insecure=False, epsilon=None)
    assert command[1:3] == ["-m", "client.department_supernode"] and command[command.index("--approved-fab-sha256") + 1] == APPROVED

    # the attack: the server ships modified client code; its FAB hash differs, the SuperNode refuses it
    genuine, modified = b"fab of the reviewed code", b"fab with a client/site_policy.py that ignores budgets"
    fabs = {"genuine": SimpleNamespace(content=genuine), "modified": SimpleNamespace(content=modified)}
    import hashlib

    fetch = approved_only(lambda name, run_id: fabs[name], {hashlib.sha256(genuine).hexdigest()})
    assert fetch("genuine", 1) is fabs["genuine"]
    with pytest.raises(UnapprovedCode, match="has not approved"):
        fetch("modified", 2)

    # the wrapper is what Flower's SuperNode loop calls
    from flwr.supernode import start_client_internal

    original = start_client_internal._pull_and_store_message
    try:
        install_approval({"a" * 64})
        assert start_client_internal._pull_and_store_message is not original
    finally:
        start_client_internal._pull_and_store_message = original
    with pytest.raises(UnapprovedCode, match="no approved app code"):
        install_approval(set())

    # approving a new version adds its hash (the FAB `flwr run .` would build from the reviewed folder)
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "department.toml").write_text('department = "hr"\nsuperlink = "h:1"\n[policy]\nrequire-secagg = true\n')
    digest = approve(kit, app=app_dir(), sha256=None)
    import tomllib

    approved = tomllib.loads((kit / "department.toml").read_text())
    assert digest == fab_sha256(app_dir()) and approved["approved-fab-sha256"] == [digest]
    assert approved["policy"] == {"require-secagg": True}
    assert approve(kit, app=None, sha256="b" * 64) == "b" * 64  # a second version: the list grows, on many lines
    approved = tomllib.loads((kit / "department.toml").read_text())
    assert approved["approved-fab-sha256"] == [digest, "b" * 64] and approved["policy"] == {"require-secagg": True}
    (kit / "department.toml").write_text('department = "hr"\nsuperlink = "h:1"\n')
    with pytest.raises(ConfigError, match="approved-fab-sha256"):
        supernode_command(kit, data=data, superlink=None, state_dir=tmp_path / "s2", insecure=True, epsilon=None)


@pytest.mark.parametrize("epsilon", [-1.0, float("nan")])
def test_department_start_refuses_a_bad_budget_at_once(tmp_path, kits, epsilon):
    from simulation.deploy.supernode import supernode_command

    data = tmp_path / "hr.csv"
    data.write_text("text,label\nmy leave request,leave\n")
    with pytest.raises(ConfigError, match="epsilon"):
        supernode_command(kits.department_kits["hr"], data=data, superlink=None, state_dir=tmp_path / "s",
                          insecure=False, epsilon=epsilon)


def test_department_start_refuses_a_budget_its_ledger_has_spent_and_says_what_to_do(tmp_path, kits):
    from client.privacy import PrivacyLedger
    from simulation.deploy.supernode import supernode_command

    data = tmp_path / "hr.csv"
    data.write_text("text,label\nmy leave request,leave\n")
    state = tmp_path / "state"
    ledger = PrivacyLedger(state, department="hr")
    plan = ledger.plan(run="earlier", num_records=1000, batch_size=100, local_epochs=1, planned_rounds=2,
                       run_epsilon=4.0, budget=4.0, delta=1e-5, accountant="prv")
    for server_round in (1, 2):
        ledger.record_round(run="earlier", server_round=server_round, plan=plan, steps=plan.steps_per_round)
    kit = kits.department_kits["hr"]
    with pytest.raises(ConfigError) as refused:
        supernode_command(kit, data=data, superlink="127.0.0.1:1", state_dir=state, insecure=True, epsilon=4.0)
    message = str(refused.value)
    assert "department hr: its budget epsilon=4.0 is spent" in message and "raise its budget knowingly" in message
    # a raised budget (the department's own decision) starts, as does a fresh department
    command, _ = supernode_command(kit, data=data, superlink="127.0.0.1:1", state_dir=state, insecure=True, epsilon=6.0)
    assert "client.department_supernode" in command
    supernode_command(kit, data=data, superlink="127.0.0.1:1", state_dir=tmp_path / "fresh", insecure=True, epsilon=4.0)


@contextmanager
def one_connection_server(kits, *, tls: bool):
    """A loopback server that accepts one connection (TLS with the provisioned server certificate,
    or plain); yields its host:port."""
    import socket
    import ssl
    import threading

    context = None
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(kits.server_kit / "server.pem", kits.server_kit / "server.key")
        context.set_alpn_protocols(["h2"])
    listener = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=_serve_once, args=(listener, context), daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        thread.join(timeout=10)
        listener.close()


def _serve_once(listener, context):
    connection, _ = listener.accept()
    try:
        with context.wrap_socket(connection, server_side=True) if context else connection:
            pass
    except OSError:
        pass


@pytest.mark.parametrize("server_tls", [True, False])
def test_an_insecure_department_is_told_that_the_superlink_speaks_tls(tmp_path, kits, server_tls):
    from simulation.deploy.supernode import supernode_command

    data = tmp_path / "hr.csv"
    data.write_text("text,label\nmy leave request,leave\n")
    with one_connection_server(kits, tls=server_tls) as address:
        if server_tls:
            with pytest.raises(ConfigError, match=r"speaks TLS.*start without --insecure"):
                supernode_command(kits.department_kits["hr"], data=data, superlink=address,
                                  state_dir=tmp_path / "state", insecure=True, epsilon=None)
            assert not (tmp_path / "state").exists()  # refused before anything is written
        else:
            command, _ = supernode_command(kits.department_kits["hr"], data=data, superlink=address,
                                           state_dir=tmp_path / "state", insecure=True, epsilon=None)
            assert "--insecure" in command


@pytest.mark.parametrize("same_provisioning", [True, False])
def test_a_kit_from_another_provisioning_is_refused_before_its_supernode_starts(tmp_path, kits, same_provisioning):
    """SuperNodes reconnect for an hour (outages, server restarts), so a kit that can never connect
    (another CA) is refused at once, by name, instead of retrying."""
    from simulation.deploy.supernode import supernode_command

    kit = kits.department_kits["hr"] if same_provisioning else provision(
        tmp_path / "rogue", departments=["hr"], hosts=["127.0.0.1"], superlink="127.0.0.1:1",
        approved_fab_sha256=APPROVED).department_kits["hr"]
    data = tmp_path / "hr.csv"
    data.write_text("text,label\nmy leave request,leave\n")
    with one_connection_server(kits, tls=True) as address:
        if same_provisioning:
            command, _ = supernode_command(kit, data=data, superlink=address, state_dir=tmp_path / "state",
                                           insecure=False, epsilon=None)
            assert "--max-retries" not in command and command[command.index("--max-wait-time") + 1] == "3600"
        else:
            with pytest.raises(ConfigError, match="CERTIFICATE_VERIFY_FAILED.*another provisioning"):
                supernode_command(kit, data=data, superlink=address, state_dir=tmp_path / "state",
                                  insecure=False, epsilon=None)
            assert not (tmp_path / "state").exists()


def test_status_names_each_node_by_its_department():
    from simulation.deploy.status import node_rows, run_rows

    # `flwr supernode list --format json` as flwr 1.42 prints it (seen on a provisioned SuperLink)
    nodes = {"success": True, "nodes": [
        {"node-id": "9932839418880666908", "owner-name": "none", "status": "online", "online-at": "2026-12-07 03:01:02Z"},
        {"node-id": "1352111111015399212", "owner-name": "none", "status": "registered", "online-at": "N/A"},
        {"node-id": "17", "owner-name": "none", "status": "online", "online-at": "2026-12-07 03:01:09Z"}]}
    names = {"finance": "9932839418880666908", "hr": "1352111111015399212"}
    assert node_rows(nodes, names=names) == [
        ("(unknown key)", "17", "online", "2026-12-07 03:01:09Z"),
        ("finance", "9932839418880666908", "online", "2026-12-07 03:01:02Z"),
        ("hr", "1352111111015399212", "registered", "N/A")]
    runs = {"success": True, "runs": [{"run-id": "42", "status": "running", "pending-at": "2026-12-07 03:02:00Z",
                                       "elapsed": "00:00:12"}]}
    assert run_rows(runs) == [("42", "running", "2026-12-07 03:02:00Z", "00:00:12")]


def test_department_start_reads_its_own_column_names_and_refuses_a_file_without_them(tmp_path, kits):
    from shared.data import Columns
    from shared.errors import DataError
    from simulation.deploy.supernode import supernode_command

    data = tmp_path / "hr.csv"
    data.write_text('"the ""body""",queue\nmy leave request,leave\n')  # a column name with quotes is fine in TOML
    kit = kits.department_kits["hr"]
    command, _ = supernode_command(kit, data=data, superlink="127.0.0.1:1", state_dir=tmp_path / "s", insecure=True,
                                   epsilon=None, columns=Columns('the "body"', "queue", None))
    from flwr.common.config import parse_config_args

    node_config = parse_config_args([command[command.index("--node-config") + 1]])  # as the SuperNode reads it
    assert node_config["text-column"] == 'the "body"' and node_config["label-column"] == "queue"
    with pytest.raises(DataError, match="missing column\\(s\\) text, label"):
        supernode_command(kit, data=data, superlink="127.0.0.1:1", state_dir=tmp_path / "s", insecure=True, epsilon=None)


def test_status_follows_the_run_folders_a_kit_started(tmp_path):
    from server.run_folder import RUN_CONFIG_FILE
    from shared.config import RunConfig
    from simulation.deploy.launcher import write_run_config
    from simulation.deploy.status import RUNS_FILE, run_folder_rows
    from tests.test_run_record import two_rounds

    run = tmp_path / "run"
    config = RunConfig(labels=("a", "b"), out_dir=str(run), num_server_rounds=3)
    two_rounds(run, config=config).finish(state="stopped", message="interrupted")
    write_run_config(config.to_run_config(), run / RUN_CONFIG_FILE)
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / RUNS_FILE).write_text(f"{run}\n{tmp_path / 'gone'}\n")
    assert run_folder_rows(kit) == [(str(run), "5", "stopped", "2 of 3"), (str(tmp_path / "gone"), "-", "unreadable", "-")]


def test_the_fab_ships_the_apps_and_everything_they_import_and_nothing_else(tmp_path):
    import ast
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    from simulation.deploy.launcher import app_dir

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app_dir()))) as fab:
        shipped = {name for name in fab.namelist() if name.endswith(".py")}
        sources = {name: fab.read(name).decode() for name in shipped}
    assert {name.split("/")[0] for name in shipped} == {"server", "client", "shared"}
    assert "server/server_app.py" in shipped and "client/client_app.py" in shipped
    # the department's own SuperNode runs these, from its install
    assert "client/approved_code.py" not in shipped and "client/department_supernode.py" not in shipped
    first_party = ("server", "client", "shared", "simulation", "tests")
    missing = []
    for name, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for module in modules:
                if module.split(".")[0] not in first_party:
                    continue
                path = module.replace(".", "/")
                if f"{path}.py" not in shipped and f"{path}/__init__.py" not in shipped:
                    missing.append(f"{name} imports {module}")
    assert not missing  # every import of the apps, lazy ones included, is inside the FAB
