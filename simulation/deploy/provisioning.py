"""`fedpriv provision`: a certificate authority, the server's TLS certificate, one kit per department.

    OUT/
      ca/ca.key                 the CA's private key (0600): keep it offline after provisioning
      server/                   the central admin's kit
        ca.crt server.pem server.key(0600)
        departments.json        department name -> OpenSSH public key (registered at server start)
        keys/<name>.pub
      <department>/             one kit per department: hand it to that unit's IT, and only it
        ca.crt node.key(0600) node.pub department.toml

Each department's private key is written once, into its own kit, with 0600 permissions.
Node keys are EC P-384 in OpenSSH format, as Flower's SuperNode authentication expects.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import ConfigError

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
CA_DAYS = 3650
SERVER_DAYS = 825


@dataclass(frozen=True)
class Provisioned:
    root: Path
    server_kit: Path
    department_kits: dict[str, Path]


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _certificate(
    *, subject: str, issuer: x509.Name | None, public_key, signing_key, days: int, ca: bool, hosts: Sequence[str] = ()
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpriv")])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        alt_names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt_names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def validate_names(departments: Sequence[str], hosts: Sequence[str]) -> None:
    problems = [f"department name {d!r}: use lower-case letters, digits, '-' or '_'" for d in departments
                if not NAME_PATTERN.match(d)]
    if len(set(departments)) != len(departments):
        problems.append("department names repeat")
    if not departments:
        problems.append("--departments names no department")
    if not hosts:
        problems.append("--hosts names no host for the server certificate")
    if problems:
        raise ConfigError(problems, source="provisioning request")


def provision(
    out: Path, *, departments: Sequence[str], hosts: Sequence[str], superlink: str, approved_fab_sha256: str,
) -> Provisioned:
    validate_names(departments, hosts)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} already holds files; provisioning never overwrites keys")
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _certificate(subject="fedpriv CA", issuer=None, public_key=ca_key.public_key(), signing_key=ca_key,
                           days=CA_DAYS, ca=True)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(out / "ca" / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "ca" / "ca.crt", ca_pem)

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _certificate(subject=hosts[0], issuer=ca_cert.subject, public_key=server_key.public_key(),
                               signing_key=ca_key, days=SERVER_DAYS, ca=False, hosts=hosts)
    server_kit = out / "server"
    _write(server_kit / "ca.crt", ca_pem)
    _write(server_kit / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM))
    _write(server_kit / "server.key", _pem_key(server_key), private=True)

    kits: dict[str, Path] = {}
    public_keys: dict[str, str] = {}
    for name in departments:
        node_key = ec.generate_private_key(ec.SECP384R1())
        public = node_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        kit = out / name
        _write(kit / "ca.crt", ca_pem)
        _write(kit / "node.key", node_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), private=True)
        _write(kit / "node.pub", public + b"\n")
        _write(server_kit / "keys" / f"{name}.pub", public + b"\n")
        (kit / "department.toml").write_text(
            f'# fedpriv department kit: give this folder to {name} only.\n'
            + tomli_w.dumps({"department": name, "superlink": superlink})
            + '# the app code (FAB sha256) this department runs; any other stops its SuperNode (README, Approved code)\n'
            + tomli_w.dumps({"approved-fab-sha256": [approved_fab_sha256]})
            + f'# data = "/path/to/{name}.csv"     # or: fedpriv department start --data FILE\n'
            f'# epsilon = 8.0                  # this department\'s own budget (the run\'s applies when lower)\n'
            f'# label-scope = ["refund", "invoice"]  # the labels its records may carry; it trains only those\n'
            f'\n# [policy]                       # limits no server request can override (see README)\n'
            f'# max-epsilon-per-round = 1.0\n# min-noise-multiplier = 0.8\n# require-secagg = true\n'
            f'# min-departments = 3\n'
        )
        kits[name] = kit
        public_keys[name] = public.decode()
    (server_kit / "departments.json").write_text(json.dumps({"superlink": superlink, "departments": public_keys}, indent=2))
    return Provisioned(out, server_kit, kits)
