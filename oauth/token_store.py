"""Each connection's MSAL token cache, kept in Key Vault and in memory.

One secret per connection generation (`dyn-<account>-<generation>`): a reconnect writes a new name, so
soft delete (a deleted name cannot be re-created for 90 days) never gets in the way. The hot path does
no Key Vault call: the cache is read once per process per generation and written back only when MSAL
changed it (a refresh). An `invalid_grant` moves the connection to `needs_reauth` and raises
ReauthRequired, which the sync worker catches to drop its work.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msal
from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.identity import ClientSecretCredential, DefaultAzureCredential
from azure.keyvault.secrets import SecretClient

from core.connections import (
    CONNECTED,
    NEEDS_REAUTH,
    Connection,
    ConnectionStore,
    LiveConnection,
    live_connection,
    utcnow,
)
from core.log import outcome
from core.settings import Settings
from dataverse.transport import TokenProvider
from oauth.authority import confidential_client
from oauth.errors import NotConnected, ReauthRequired, TokenUnavailable
from oauth.instance_url import InvalidInstanceUrl, parse_instance_url

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.msal.token-cache+json"
# Errors that mean the refresh token is dead for good: only a new sign-in helps.
_REAUTH_ERRORS = ("invalid_grant", "interaction_required", "consent_required", "login_required")


def secret_client(settings: Settings) -> SecretClient:
    """The Key Vault client: managed identity in Azure, the Entra stand-in's client credentials locally."""
    dev = settings.dev if settings.is_development else None
    verify = {"connection_verify": dev.ca_bundle} if dev and dev.ca_bundle else {}
    if dev and dev.entra_authority:
        parts = urlsplit(dev.entra_authority)
        tenant = parts.path.strip("/").split("/")[0]
        local = ClientSecretCredential(
            tenant, settings.dynamics_client_id, settings.dynamics_client_secret,
            authority=f"{parts.scheme}://{parts.netloc}", disable_instance_discovery=True, **verify)
        # The vault's challenge names vault.azure.net, which a local vault's host does not end with.
        return SecretClient(settings.key_vault_url, local, verify_challenge_resource=False, **verify)
    credential = DefaultAzureCredential(managed_identity_client_id=settings.managed_identity_client_id)
    return SecretClient(settings.key_vault_url, credential, **verify)


def secret_name(account_id: str, generation: str) -> str:
    """`dyn-<account>-<generation>`: Key Vault names allow only [0-9A-Za-z-], at most 127 characters."""
    return f"dyn-{re.sub(r'[^0-9A-Za-z-]', '-', account_id)}-{generation}"[:127]


def first_line(description: str | None) -> str:
    """Entra's error_description without the trace id and timestamp lines."""
    return (description or "").replace("\r", "").split("\n")[0].strip()[:300]


@dataclass
class _Entry:
    cache: msal.SerializableTokenCache
    lock: threading.Lock = field(default_factory=threading.Lock)
    app: msal.ConfidentialClientApplication | None = None


class TokenStore:
    def __init__(self, settings: Settings, secrets: SecretClient, connections: ConnectionStore) -> None:
        self.settings = settings
        self.secrets = secrets
        self.connections = connections
        self._entries: dict[str, _Entry] = {}  # by generation
        self._lock = threading.Lock()

    # -- connect and disconnect --------------------------------------------------------------------

    def store_new(self, account_id: str, generation: str, cache: msal.SerializableTokenCache) -> str:
        """Save a freshly signed-in cache under this generation's own secret; returns the secret name."""
        name = secret_name(account_id, generation)
        self.secrets.set_secret(name, cache.serialize(), content_type=CONTENT_TYPE,
                                tags={"account_id": account_id, "generation": generation})
        cache.has_state_changed = False
        with self._lock:
            self._entries[generation] = _Entry(cache)
        return name

    def delete(self, name: str | None, generation: str | None = None) -> None:
        """Delete a generation's secret (soft delete; its name is never reused) and forget its cache."""
        if generation:
            with self._lock:
                self._entries.pop(generation, None)
        if not name:
            return
        with contextlib.suppress(ResourceNotFoundError):
            self.secrets.begin_delete_secret(name)  # the DELETE is sent now; no need to poll until purged

    # -- access tokens -----------------------------------------------------------------------------

    def provider(self, conn: Connection) -> TokenProvider:
        """`provider(force_refresh=False) -> access token` for `conn`'s instance."""

        def token(force_refresh: bool = False) -> str:
            return self.access_token(conn, force_refresh=force_refresh)

        return token

    def access_token(self, row: Connection, *, force_refresh: bool = False) -> str:
        conn = live_connection(row)
        if conn is None or not conn.secret_name:
            raise NotConnected(row.account_id, f"account {row.account_id} has no active Dynamics connection")
        secret = conn.secret_name
        entry = self._entry(conn, secret)
        with entry.lock:
            try:
                if entry.app is None:
                    entry.app = confidential_client(self.settings, login_host=self._login_host(conn),
                                                    tenant=conn.tenant_id or "organizations", cache=entry.cache)
                accounts = entry.app.get_accounts()
                result: dict[str, Any] | None = None
                if accounts:
                    result = entry.app.acquire_token_silent_with_error(
                        [f"{conn.instance_url}/user_impersonation"], accounts[0], force_refresh=force_refresh)
            except (OSError, ValueError) as exc:  # network (requests' errors are OSErrors) or bad metadata
                raise TokenUnavailable(f"Microsoft sign-in could not be reached: {type(exc).__name__}") from exc
            if result is None:
                raise self._needs_reauth(conn, "the stored sign-in holds no usable refresh token")
            if "access_token" not in result:
                error = str(result.get("error", ""))
                if error in _REAUTH_ERRORS:
                    raise self._needs_reauth(conn, first_line(result.get("error_description")) or error)
                detail = first_line(result.get("error_description"))
                raise TokenUnavailable(f"Microsoft sign-in failed: {error} {detail}")
            if entry.cache.has_state_changed:
                self._write_back(conn, secret, entry.cache)
            if result.get("token_source") == "identity_provider":
                self._mark_refreshed(conn)
            token: str = result["access_token"]
            return token

    def _entry(self, conn: LiveConnection, secret: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(conn.generation)
            if entry is not None:
                return entry
        try:
            value = self.secrets.get_secret(secret).value
        except ResourceNotFoundError:
            raise self._needs_reauth(conn, "the stored sign-in is missing from Key Vault") from None
        except AzureError as exc:
            raise TokenUnavailable(f"Key Vault could not be read: {type(exc).__name__}") from exc
        cache = msal.SerializableTokenCache()
        cache.deserialize(value)
        with self._lock:
            return self._entries.setdefault(conn.generation, _Entry(cache))

    def _login_host(self, conn: LiveConnection) -> str:
        dev_hosts = self.settings.dev.allowed_instance_hosts if self.settings.is_development else ()
        try:
            return parse_instance_url(conn.instance_url, dev_hosts).login_host
        except InvalidInstanceUrl as exc:  # a row written under other rules: never send it a token
            raise NotConnected(conn.account_id, f"instance URL is no longer accepted: {exc.message}") from exc

    def _write_back(self, conn: LiveConnection, secret: str, cache: msal.SerializableTokenCache) -> None:
        try:
            self.secrets.set_secret(secret, cache.serialize(), content_type=CONTENT_TYPE,
                                    tags={"account_id": conn.account_id, "generation": conn.generation})
            cache.has_state_changed = False
        except AzureError as exc:
            # The token in hand is good; the next refresh writes again. Other instances still hold a
            # refresh token Entra accepts (Entra does not revoke the previous one on rotation).
            outcome(log, "token_store", "write_back_failed", level=logging.WARNING,
                    account_id=conn.account_id, error=type(exc).__name__)

    def _mark_refreshed(self, conn: LiveConnection) -> None:
        now = utcnow()

        def mark(row: Connection) -> bool:
            if row.generation != conn.generation:
                return False
            row.token_refreshed_at = now
            return True

        self.connections.update(conn.account_id, mark)

    def _needs_reauth(self, conn: LiveConnection, detail: str) -> ReauthRequired:
        """Move the connection (this generation only) to needs_reauth; returns the ReauthRequired to raise."""
        who = f" of {conn.connected_by}" if conn.connected_by else ""
        message = (f"Microsoft no longer accepts the sign-in{who} for {conn.instance_url} ({detail}). "
                   "An administrator must reconnect Dynamics 365.")

        def mark(row: Connection) -> bool:
            if row.generation != conn.generation or row.state != CONNECTED:
                return False
            row.state, row.reason_category, row.reason = NEEDS_REAUTH, "auth", message
            return True

        self.connections.update(conn.account_id, mark)
        with self._lock:
            self._entries.pop(conn.generation, None)
        outcome(log, "token_store", "needs_reauth", level=logging.WARNING, account_id=conn.account_id,
                detail=detail)
        return ReauthRequired(conn.account_id, message)
