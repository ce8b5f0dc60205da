"""A department signs each reply with its kit key, so that the name in a reply is the key's owner's.

SuperNode authentication keeps unregistered nodes out, but the department name in a reply is just
a metric the node reports: a node holding ``it``'s key could call itself ``hr`` and be merged with
``hr``. In deployment each department signs what identifies its reply (run, round, its name, its
status and the ledger lines it reports) with the EC P-384 private key from its kit (ECDSA, SHA-384,
``cryptography``), and the server verifies it with the public key the provisioning registered for
that name (``department-keys`` in the run config). A simulation has no kits and signs nothing.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


def reply_message(*, run: str, server_round: int, department: str, status: str, ledger: str) -> bytes:
    return json.dumps({"run": run, "round": server_round, "department": department, "status": status,
                       "ledger": ledger}, sort_keys=True).encode()


def sign(message: bytes, *, private_key: Path) -> str:
    key = serialization.load_ssh_private_key(private_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{private_key}: not an EC private key")
    return base64.b64encode(key.sign(message, ec.ECDSA(hashes.SHA384()))).decode()


def verify(message: bytes, signature: str, *, public_key: str) -> bool:
    try:
        key = serialization.load_ssh_public_key(public_key.encode())
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return False
        key.verify(base64.b64decode(signature, validate=True), message, ec.ECDSA(hashes.SHA384()))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False
