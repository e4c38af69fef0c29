"""A throw-away test CA and a server certificate for the HTTPS stand-ins (Entra, Key Vault, Dataverse)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass(frozen=True)
class TestCerts:
    ca_pem: Path  # the test CA alone
    bundle: Path  # the test CA plus the system roots, for clients that must trust both
    server_cert: Path
    server_key: Path


def make_certs(directory: Path) -> TestCerts:
    """Create (or reuse) a CA and a localhost/127.0.0.1 server certificate in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    certs = TestCerts(directory / "ca.pem", directory / "bundle.pem", directory / "server.pem",
                      directory / "server.key")
    if all(p.exists() for p in (certs.ca_pem, certs.bundle, certs.server_cert, certs.server_key)):
        return certs
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(certs.ca_pem))
    server.private_key_pem.write_to_path(str(certs.server_key))
    server.cert_chain_pems[0].write_to_path(str(certs.server_cert))
    system = SYSTEM_BUNDLE.read_bytes() if SYSTEM_BUNDLE.exists() else b""
    certs.bundle.write_bytes(certs.ca_pem.read_bytes() + b"\n" + system)
    return certs
