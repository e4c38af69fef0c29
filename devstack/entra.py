"""Start the Entra ID stand-in (devstack/entra/oauth_mock.mjs, oauth2-mock-server) and steer it.

The stand-in serves a tenant's v2.0 endpoints over HTTPS at https://localhost:PORT/<tenant>/v2.0, the
authority the app uses (DEV_ENTRA_AUTHORITY) in place of login.microsoftonline.com. `EntraStandIn`
also wraps its /_control/ endpoints, which tests use to deny consent or fail refreshes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from devstack.certs import TestCerts
from devstack.processes import ROOT, StackError, free_port, stop_process, wait_for_port

SCRIPT = Path(__file__).resolve().parent / "entra" / "oauth_mock.mjs"
DEFAULT_TENANT = "00000000-0000-0000-0000-000000000001"


@dataclass
class EntraStandIn:
    proc: subprocess.Popen
    port: int
    tenant_id: str
    ca_pem: Path

    @property
    def host(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def authority(self) -> str:
        """The OIDC authority (issuer) of the stand-in's tenant."""
        return f"{self.host}/{self.tenant_id}/v2.0"

    @property
    def jwks_url(self) -> str:
        return f"{self.authority}/discovery/v2.0/keys"

    def _control(self, method: str, name: str, body: dict[str, Any] | None = None) -> Any:
        session = requests.Session()
        session.trust_env = False  # REQUESTS_CA_BUNDLE would override verify=
        resp = session.request(method, f"{self.host}/_control/{name}", json=body, verify=str(self.ca_pem), timeout=10)
        resp.raise_for_status()
        return resp.json()

    def deny_next_consent(self) -> None:
        self._control("POST", "deny-next-consent")

    def fail_refresh(self, enabled: bool = True) -> None:
        self._control("POST", "fail-refresh", {"enabled": enabled})

    def sign_in_as(self, username: str, oid: str, name: str = "Test User") -> None:
        self._control("POST", "user", {"username": username, "oid": oid, "name": name})

    def reset(self) -> None:
        self._control("POST", "reset")

    def request_count(self) -> int:
        """Requests served outside /_control/ (proves whether the app talked to Entra at all)."""
        return int(self._control("GET", "stats")["requests"])

    def issued(self) -> dict[str, list[str]]:
        """Every code, access token, id token and refresh token handed out so far."""
        return self._control("GET", "issued")

    def stop(self) -> None:
        stop_process(self.proc)


def start_entra(certs: TestCerts, *, client_id: str, client_secret: str, redirect_uris: tuple[str, ...] = (),
                tenant_id: str = DEFAULT_TENANT, port: int = 0, log_file: Path | None = None) -> EntraStandIn:
    node = shutil.which("node")
    if node is None:
        raise StackError("node is not on PATH (the Entra stand-in runs on Node)")
    if not (ROOT / "node_modules" / "oauth2-mock-server").exists():
        raise StackError("node_modules/oauth2-mock-server is missing: run `make deps`")
    port = port or free_port()
    cmd = [node, str(SCRIPT), "--port", str(port), "--cert", str(certs.server_cert), "--key", str(certs.server_key),
           "--tenant", tenant_id, "--client-id", client_id]
    for uri in redirect_uris:
        cmd += ["--redirect-uri", uri]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the process
    env = {**os.environ, "ENTRA_CLIENT_SECRET": client_secret}  # not on the command line, where ps shows it
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        wait_for_port(port, proc, name="entra stand-in")
    except StackError:
        stop_process(proc)
        raise
    return EntraStandIn(proc, port, tenant_id, certs.ca_pem)
