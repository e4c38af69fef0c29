"""One typed settings object, read from the environment and validated once.

Every app setting the code reads is named in APP_SETTINGS (the infra test compares it with the
Bicep). Development-only overrides are honoured only with APP_ENV=development; anywhere else they
are ignored with a warning, so a stray override can never weaken production.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import urlsplit

from core.errors import SettingsError

log = logging.getLogger(__name__)

STORAGE = "AzureWebJobsStorage"
STORAGE_QUEUE_URI = "AzureWebJobsStorage__queueServiceUri"
STORAGE_TABLE_URI = "AzureWebJobsStorage__tableServiceUri"
STORAGE_CLIENT_ID = "AzureWebJobsStorage__clientId"

# Settings the app itself reads in Azure (the platform's own, like APPLICATIONINSIGHTS_CONNECTION_STRING,
# are not listed: the code never reads them).
APP_SETTINGS = (
    STORAGE,
    STORAGE_QUEUE_URI,
    STORAGE_TABLE_URI,
    STORAGE_CLIENT_ID,
    "KEY_VAULT_URL",
    "DYNAMICS_CLIENT_ID",
    "DYNAMICS_CLIENT_SECRET",
    "OAUTH_REDIRECT_URI",
    "WAVE_WEBHOOK_SECRETS",
    "WAVE_API_BASE_URL",
    "WAVE_API_TOKEN",
    "WAVE_RETURN_URL_PREFIXES",
    "APP_ENV",
    "AZURE_CLIENT_ID",
)
# Honoured only when APP_ENV=development.
DEV_SETTINGS = (
    "DEV_ENTRA_AUTHORITY",  # OIDC authority of the local Entra stand-in, replaces the cloud's authority
    "DEV_ALLOWED_INSTANCE_HOSTS",  # extra instance hosts (host:port), e.g. the loopback Dataverse simulator
    "DEV_CA_BUNDLE",  # CA bundle trusted for the stand-ins' HTTPS
    "DEV_DATAVERSE_WINDOW_SECONDS",  # the simulator's scaled limit window (bench), instead of Dataverse's 300 s
)


@dataclass(frozen=True)
class StorageSettings:
    """Either a connection string (Azurite, or a key-based account) or identity-based service URIs."""

    connection_string: str | None = field(default=None, repr=False)
    queue_service_uri: str | None = None
    table_service_uri: str | None = None
    managed_identity_client_id: str | None = None


@dataclass(frozen=True)
class DevOverrides:
    entra_authority: str | None = None
    allowed_instance_hosts: tuple[str, ...] = ()
    ca_bundle: str | None = None
    dataverse_window_seconds: float | None = None


@dataclass(frozen=True)
class Settings:
    storage: StorageSettings
    key_vault_url: str
    dynamics_client_id: str
    dynamics_client_secret: str = field(repr=False)
    oauth_redirect_uri: str = ""
    wave_webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    wave_api_base_url: str = ""
    wave_api_token: str = field(default="", repr=False)
    wave_return_url_prefixes: tuple[str, ...] = ()
    app_env: str = "production"
    # The user-assigned managed identity for Key Vault (and storage, unless its own clientId is set).
    managed_identity_client_id: str | None = None
    dev: DevOverrides = field(default_factory=DevOverrides)

    @property
    def is_development(self) -> bool:
        return self.app_env == "development"


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise SettingsError(name, "is missing")
    return value


def _url(name: str, value: str, *, allow_loopback_http: bool) -> str:
    parts = urlsplit(value)
    if parts.scheme == "https" and parts.hostname:
        return value
    if allow_loopback_http and parts.scheme == "http" and parts.hostname in ("localhost", "127.0.0.1", "::1"):
        return value
    expected = "an https URL (or http on localhost)" if allow_loopback_http else "an https URL"
    raise SettingsError(name, f"must be {expected}", got=value)


def _csv(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in _required(env, name).split(","))
    if any(not item for item in items):
        raise SettingsError(name, "has an empty entry in its comma-separated list")
    return items


def storage_settings(env: Mapping[str, str] | None = None) -> StorageSettings:
    """The storage settings alone (the process environment by default): usable while another setting is not."""
    env = os.environ if env is None else env
    conn = env.get(STORAGE, "").strip()
    queue_uri = env.get(STORAGE_QUEUE_URI, "").strip()
    table_uri = env.get(STORAGE_TABLE_URI, "").strip()
    if conn:
        if "=" not in conn:
            raise SettingsError(STORAGE, "is not a storage connection string (expected Key=Value;... pairs)")
        return StorageSettings(connection_string=conn)
    if queue_uri or table_uri:
        if not (queue_uri and table_uri):
            missing = STORAGE_TABLE_URI if queue_uri else STORAGE_QUEUE_URI
            raise SettingsError(missing, "is missing (identity-based storage needs both service URIs)")
        return StorageSettings(
            queue_service_uri=_url(STORAGE_QUEUE_URI, queue_uri, allow_loopback_http=False),
            table_service_uri=_url(STORAGE_TABLE_URI, table_uri, allow_loopback_http=False),
            managed_identity_client_id=env.get(STORAGE_CLIENT_ID, "").strip() or None,
        )
    raise SettingsError(STORAGE, f"is missing (set it, or {STORAGE_QUEUE_URI} and {STORAGE_TABLE_URI})")


def _dev_overrides(env: Mapping[str, str], development: bool) -> DevOverrides:
    present = [name for name in DEV_SETTINGS if env.get(name, "").strip()]
    if not present:
        return DevOverrides()
    if not development:
        log.warning("ignoring development-only settings %s: APP_ENV is not 'development'", ", ".join(present))
        return DevOverrides()
    authority = env.get("DEV_ENTRA_AUTHORITY", "").strip() or None
    if authority:
        authority = _url("DEV_ENTRA_AUTHORITY", authority, allow_loopback_http=False).rstrip("/")
    hosts = tuple(h.strip().lower() for h in env.get("DEV_ALLOWED_INSTANCE_HOSTS", "").split(",") if h.strip())
    ca_bundle = env.get("DEV_CA_BUNDLE", "").strip() or None
    if ca_bundle and not os.path.isfile(ca_bundle):
        raise SettingsError("DEV_CA_BUNDLE", "names a file that does not exist", got=ca_bundle)
    window = env.get("DEV_DATAVERSE_WINDOW_SECONDS", "").strip() or None
    try:
        window_seconds = float(window) if window else None
    except ValueError:
        window_seconds = -1.0
    if window_seconds is not None and not 0 < window_seconds < math.inf:
        raise SettingsError("DEV_DATAVERSE_WINDOW_SECONDS", "must be a positive number of seconds", got=window)
    log.warning("development mode: honouring local overrides %s", ", ".join(present))
    return DevOverrides(entra_authority=authority, allowed_instance_hosts=hosts, ca_bundle=ca_bundle,
                        dataverse_window_seconds=window_seconds)


# App Service hands the app a setting whose Key Vault reference it could not resolve (no access yet, a
# role assignment still propagating, a wrong secret URI) as the reference's own text
# (https://learn.microsoft.com/azure/app-service/app-service-key-vault-references, "Troubleshoot").
# Taken as a value, that text would become, say, the webhook signing secret.
_KEY_VAULT_REFERENCE = re.compile(r"@Microsoft\.KeyVault\(", re.IGNORECASE)


def _refuse_unresolved_references(env: Mapping[str, str]) -> None:
    for name in (*APP_SETTINGS, *DEV_SETTINGS):
        if _KEY_VAULT_REFERENCE.search(env.get(name, "")):
            raise SettingsError(name, "is a Key Vault reference that App Service could not resolve (check that the "
                                      "app's identity may read the secret, the vault's network rules and the "
                                      "reference's secret URI, then restart the app)")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting; raise SettingsError naming the first bad one."""
    env = os.environ if env is None else env
    _refuse_unresolved_references(env)  # first, so that no other check quotes the reference
    app_env = env.get("APP_ENV", "production").strip().lower() or "production"
    if app_env not in ("production", "development"):
        raise SettingsError("APP_ENV", "must be 'production' or 'development'", got=app_env)
    development = app_env == "development"
    return Settings(
        storage=storage_settings(env),
        key_vault_url=_url(
            "KEY_VAULT_URL", _required(env, "KEY_VAULT_URL"), allow_loopback_http=False
        ).rstrip("/"),
        dynamics_client_id=_required(env, "DYNAMICS_CLIENT_ID"),
        dynamics_client_secret=_required(env, "DYNAMICS_CLIENT_SECRET"),
        oauth_redirect_uri=_url(
            "OAUTH_REDIRECT_URI", _required(env, "OAUTH_REDIRECT_URI"), allow_loopback_http=True
        ),
        wave_webhook_secrets=_csv(env, "WAVE_WEBHOOK_SECRETS"),
        wave_api_base_url=_url(
            "WAVE_API_BASE_URL", _required(env, "WAVE_API_BASE_URL"), allow_loopback_http=development
        ).rstrip("/"),
        wave_api_token=_required(env, "WAVE_API_TOKEN"),
        wave_return_url_prefixes=tuple(
            _url("WAVE_RETURN_URL_PREFIXES", p, allow_loopback_http=development)
            for p in _csv(env, "WAVE_RETURN_URL_PREFIXES")
        ),
        app_env=app_env,
        managed_identity_client_id=env.get("AZURE_CLIENT_ID", "").strip() or None,
        dev=_dev_overrides(env, development),
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, validated on first use."""
    return load_settings()


def settings_problem() -> SettingsError | None:
    """The first bad setting of this process, or None when the settings are usable.

    Not cached when bad (get_settings caches only success), so a test that repairs the environment and
    clears get_settings sees the repair."""
    try:
        get_settings()
    except SettingsError as exc:
        return exc
    return None
