"""The Key Vault simulator behaves like a real vault for the SDK the app uses: the bearer challenge, a real
token from the Entra stand-in, soft delete with purge protection, paging, and the documented errors."""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.identity import ClientSecretCredential
from azure.keyvault.secrets import SecretClient

from devstack.keyvault_sim import KeyVaultSimulator


@pytest.fixture(scope="module")
def credential(entra, app_env, test_certs):
    return ClientSecretCredential(entra.tenant_id, app_env["DYNAMICS_CLIENT_ID"], app_env["DYNAMICS_CLIENT_SECRET"],
                                  authority=entra.host, disable_instance_discovery=True,
                                  connection_verify=str(test_certs.bundle))


def _client(kv: KeyVaultSimulator, credential, test_certs) -> SecretClient:
    return SecretClient(kv.url, credential, verify_challenge_resource=False, connection_verify=str(test_certs.bundle))


@pytest.fixture
def vault(test_certs, entra):
    with KeyVaultSimulator(test_certs.server_cert, test_certs.server_key, tenant_id=entra.tenant_id,
                           jwks_url=entra.jwks_url, ca_bundle=str(test_certs.ca_pem)) as kv:
        yield kv


def _name() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


def test_challenge_then_a_real_token_for_the_vault_audience(vault, credential, test_certs):
    client = _client(vault, credential, test_certs)
    client.set_secret("first", "v1")
    first, second = vault.requests[:2]
    assert (first.method, first.authenticated, first.status) == ("PUT", False, 401)  # the challenge
    assert (second.method, second.authenticated, second.status) == ("PUT", True, 200)
    (token,) = vault.tokens_seen
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["aud"] == "https://vault.azure.net"
    assert client.get_secret("first").value == "v1"


def test_set_makes_versions_and_get_returns_the_latest(vault, credential, test_certs):
    client = _client(vault, credential, test_certs)
    name = _name()
    v1 = client.set_secret(name, "one", content_type="text/plain", tags={"k": "v"})
    client.set_secret(name, "two")
    assert client.get_secret(name).value == "two"
    assert client.get_secret(name, v1.properties.version).value == "one"
    assert len(list(client.list_properties_of_secret_versions(name))) == 2


def test_listing_pages_with_next_links(vault, credential, test_certs):
    client = _client(vault, credential, test_certs)
    names = {_name() for _ in range(30)}
    for name in names:
        client.set_secret(name, "x")
    listed = {p.name for p in client.list_properties_of_secrets()}
    assert listed == names
    assert sum(1 for r in vault.requests if r.path == "/secrets" and r.status == 200) == 2  # 25 + 5


def test_soft_delete_blocks_the_name_and_purge_protection_blocks_purge(vault, credential, test_certs):
    client = _client(vault, credential, test_certs)
    name = _name()
    client.set_secret(name, "cache")
    deleted = client.begin_delete_secret(name).result()
    assert deleted.recovery_id.endswith(f"/deletedsecrets/{name}") and deleted.scheduled_purge_date
    with pytest.raises(ResourceNotFoundError):
        client.get_secret(name)
    with pytest.raises(ResourceExistsError) as info:
        client.set_secret(name, "again")
    assert info.value.status_code == 409 and "deleted but recoverable state" in str(info.value)
    with pytest.raises(HttpResponseError) as purge:
        client.purge_deleted_secret(name)
    assert purge.value.status_code == 403
    assert [d.name for d in client.list_deleted_secrets()] == [name]
    client.begin_recover_deleted_secret(name).result()
    assert client.get_secret(name).value == "cache"


def test_missing_secret_is_404(vault, credential, test_certs):
    with pytest.raises(ResourceNotFoundError):
        _client(vault, credential, test_certs).get_secret("never-set")
    with pytest.raises(ResourceNotFoundError):
        _client(vault, credential, test_certs).begin_delete_secret("never-set")


def test_bad_names_and_oversized_values_are_400(vault, credential, test_certs):
    client = _client(vault, credential, test_certs)
    with pytest.raises(HttpResponseError) as bad_name:
        client.set_secret("under_score", "x")
    assert bad_name.value.status_code == 400
    with pytest.raises(HttpResponseError) as too_big:
        client.set_secret(_name(), "x" * (25 * 1024 + 1))
    assert too_big.value.status_code == 400


class _StaticCredential:
    def __init__(self, token: str) -> None:
        self.token = token

    def get_token(self, *scopes, **kwargs) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 3600)


def test_tokens_for_another_audience_or_unsigned_are_refused(vault, entra, app_env, test_certs):
    import msal
    import requests

    http = requests.Session()
    http.verify, http.trust_env = str(test_certs.bundle), False
    app = msal.ConfidentialClientApplication(app_env["DYNAMICS_CLIENT_ID"], app_env["DYNAMICS_CLIENT_SECRET"],
                                             oidc_authority=entra.authority, http_client=http)
    other = app.acquire_token_for_client(["https://graph.example/.default"])["access_token"]
    header, payload, _ = app.acquire_token_for_client(["https://vault.azure.net/.default"])["access_token"].split(".")
    forged = f"{header}.{payload}.{base64.urlsafe_b64encode(b'not a signature').decode().rstrip('=')}"
    for token in (other, forged, "not-a-jwt"):
        client = _client(vault, _StaticCredential(token), test_certs)
        with pytest.raises(HttpResponseError) as info:
            client.get_secret("anything")
        assert info.value.status_code == 401
    assert not vault.names()
