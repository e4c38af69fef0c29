"""A Key Vault (secrets) simulator over HTTPS, faithful where the app depends on the real service.

What it does like Azure Key Vault (REST api-version 7.x / 2025+):
- every request needs `api-version`; an unauthenticated request gets 401 with the bearer challenge
  (`WWW-Authenticate: Bearer authorization="<login>/<tenant>", resource="https://vault.azure.net"`),
  which azure-keyvault-secrets answers by asking its credential for a token;
- the bearer token must be a JWT for audience `https://vault.azure.net` that has not expired, and,
  when a JWKS URL is given, signed by that identity provider (AKV10022 / AKV10032 otherwise);
- secret names are `[0-9A-Za-z-]{1,127}`, values at most 25 KiB;
- set (new version each time), get (latest or a version), list (paged with nextLink), versions,
  delete; soft delete is ON with purge protection, as on every new vault: a deleted name lives in
  /deletedsecrets, re-creating it answers 409 ObjectIsDeletedButRecoverable, purge answers 403, and
  only recover brings it back.

Tests inspect it through `value()`, `names()`, `deleted_names()`, `requests` and `tokens_seen`, and set
`forbidden` to make every call answer 403 (a missing role assignment).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt

from devstack.http_server import Served, serve_until_terminated

RESOURCE = "https://vault.azure.net"
NAME_RE = re.compile(r"^[0-9A-Za-z-]{1,127}$")
MAX_VALUE_BYTES = 25 * 1024
PAGE_SIZE = 25
RETENTION_DAYS = 90


@dataclass
class Version:
    id: str
    value: str
    content_type: str | None
    tags: dict[str, str] | None
    created: int
    updated: int
    enabled: bool = True


@dataclass
class Secret:
    versions: list[Version] = field(default_factory=list)


@dataclass
class Deleted:
    secret: Secret
    deleted_date: int
    scheduled_purge_date: int


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    authenticated: bool
    status: int


class KeyVaultSimulator(Served):
    """`with KeyVaultSimulator(cert, key, tenant_id=...) as kv:` serves on kv.url until the block ends."""

    def __init__(self, certfile: Path | str, keyfile: Path | str, *, tenant_id: str,
                 login_authority: str = "https://login.microsoftonline.com", jwks_url: str | None = None,
                 ca_bundle: str | None = None, purge_protection: bool = True, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.tenant_id = tenant_id
        self.challenge = (f'Bearer authorization="{login_authority.rstrip("/")}/{tenant_id}", '
                          f'resource="{RESOURCE}"')
        self.purge_protection = purge_protection
        self._jwks = _JwksKeys(jwks_url, ca_bundle) if jwks_url else None
        self._lock = threading.Lock()
        self._secrets: dict[str, Secret] = {}
        self._deleted: dict[str, Deleted] = {}
        self.requests: list[RequestRecord] = []
        self.tokens_seen: set[str] = set()
        self.forbidden = False  # True: every call answers 403, as when the caller lacks its RBAC role
        self._listen(self.dispatch, host, port, "keyvault-sim", certfile=certfile, keyfile=keyfile)

    # -- inspection for tests ----------------------------------------------------------------------

    def value(self, name: str) -> str | None:
        with self._lock:
            secret = self._secrets.get(name)
            return secret.versions[-1].value if secret else None

    def names(self) -> set[str]:
        with self._lock:
            return set(self._secrets)

    def deleted_names(self) -> set[str]:
        with self._lock:
            return set(self._deleted)

    def all_values(self) -> list[str]:
        """Every value ever stored, deleted ones included (the log test searches for them)."""
        with self._lock:
            live = [v.value for s in self._secrets.values() for v in s.versions]
            gone = [v.value for d in self._deleted.values() for v in d.secret.versions]
        return live + gone

    # -- the REST surface --------------------------------------------------------------------------

    def _authenticate(self, header: str) -> tuple[int, dict[str, Any]] | None:
        """None when the bearer token is acceptable, else the 401 answer."""
        if not header.lower().startswith("bearer "):
            return 401, _error("Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.")
        token = header[7:].strip()
        self.tokens_seen.add(token)
        try:
            if self._jwks is not None:
                claims = jwt.decode(token, self._jwks.key_for(token), algorithms=["RS256"],
                                    options={"verify_aud": False})
            else:
                claims = jwt.decode(token, options={"verify_signature": False, "verify_exp": True})
        except jwt.ExpiredSignatureError:
            return 401, _error("Unauthorized", "AKV10032: Token has expired.")
        except (jwt.PyJWTError, ValueError, KeyError) as exc:
            return 401, _error("Unauthorized", f"AKV10022: Invalid token: {type(exc).__name__}.")
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if not any(a in (RESOURCE, RESOURCE + "/") for a in audiences):
            return 401, _error("Unauthorized", f"AKV10022: Invalid audience. Expected {RESOURCE}, found: {audience}.")
        return None

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes, base: str
               ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        parts = urlsplit(raw_path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        path = parts.path.rstrip("/")
        if "api-version" not in query:
            return 400, _error("BadParameter", "The request is missing the api-version query parameter."), {}
        denied = self._authenticate(headers.get("authorization", ""))
        if denied:
            return denied[0], denied[1], {"WWW-Authenticate": self.challenge}
        if self.forbidden:
            return 403, _error("Forbidden", "Caller is not authorized to perform action on resource. If role "
                                            "assignments were recently changed, please wait several minutes for "
                                            "role assignments to become effective."), {}
        with self._lock:
            return self._route(method, path, query, body, base, parts.query)

    def _route(self, method: str, path: str, query: dict[str, str], body: bytes, base: str, raw_query: str
               ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        segments = [s for s in path.split("/") if s]
        if segments[:1] == ["secrets"]:
            if len(segments) == 1 and method == "GET":
                return self._list(base, query, deleted=False)
            name = segments[1] if len(segments) > 1 else ""
            if not NAME_RE.fullmatch(name):
                return 400, _error("BadParameter", f"The request URI contains an invalid name: {name[:130]}"), {}
            rest = segments[2:]
            if not rest and method == "PUT":
                return self._set(name, body, base)
            if rest == ["versions"] and method == "GET":
                return self._versions(name, base)
            if len(rest) <= 1 and method == "GET":
                return self._get(name, rest[0] if rest else "", base)
            if not rest and method == "DELETE":
                return self._delete(name, base)
            if len(rest) == 1 and method == "PATCH":
                return self._update(name, rest[0], body, base)
        if segments[:1] == ["deletedsecrets"]:
            if len(segments) == 1 and method == "GET":
                return self._list(base, query, deleted=True)
            name = segments[1] if len(segments) > 1 else ""
            if len(segments) == 2 and method == "GET":
                found = self._deleted.get(name)
                if not found:
                    return 404, _error("SecretNotFound", f"Deleted Secret not found: {name}"), {}
                return 200, self._deleted_bundle(name, found, base), {}
            if len(segments) == 2 and method == "DELETE":
                if name not in self._deleted:
                    return 404, _error("SecretNotFound", f"Deleted Secret not found: {name}"), {}
                if self.purge_protection:
                    return 403, _error("Forbidden", 'Operation "purge" is not allowed because purge protection '
                                                    "is enabled for this vault. Key Vault service will "
                                                    "automatically purge it after the retention period has "
                                                    "passed."), {}
                del self._deleted[name]
                return 204, None, {}
            if segments[2:] == ["recover"] and method == "POST":
                found = self._deleted.pop(name, None)
                if not found:
                    return 404, _error("SecretNotFound", f"Deleted Secret not found: {name}"), {}
                self._secrets[name] = found.secret
                return 200, self._bundle(name, found.secret.versions[-1], base, with_value=False), {}
        return 400, _error("BadParameter", f"Unsupported operation {method} {path}"), {}

    def _set(self, name: str, body: bytes, base: str) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        if name in self._deleted:
            return 409, {"error": {
                "code": "Conflict",
                "message": f"Secret {name} is currently in a deleted but recoverable state, and its name cannot "
                           "be reused; in this state, the secret can only be recovered or purged.",
                "innererror": {"code": "ObjectIsDeletedButRecoverable"}}}, {}
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            return 400, _error("BadParameter", "The request body is not valid JSON."), {}
        value = payload.get("value") if isinstance(payload, dict) else None
        if not isinstance(value, str):
            return 400, _error("BadParameter", "Property 'value' is required."), {}
        if len(value.encode()) > MAX_VALUE_BYTES:
            return 400, _error("BadParameter", "Secret value is too large. The maximum size is 25 KB."), {}
        now = int(time.time())
        version = Version(id=uuid.uuid4().hex, value=value, content_type=payload.get("contentType"),
                          tags=payload.get("tags"), created=now, updated=now,
                          enabled=(payload.get("attributes") or {}).get("enabled", True))
        self._secrets.setdefault(name, Secret()).versions.append(version)
        return 200, self._bundle(name, version, base), {}

    def _get(self, name: str, version_id: str, base: str) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        secret = self._secrets.get(name)
        if not secret:
            return 404, _error("SecretNotFound", f"A secret with (name/id) {name} was not found in this key vault. "
                                                 "If you recently deleted this secret you may be able to recover "
                                                 "it using the correct recovery command."), {}
        version = secret.versions[-1] if not version_id else next(
            (v for v in secret.versions if v.id == version_id), None)
        if version is None:
            return 404, _error("SecretNotFound", f"A secret with (name/id) {name}/{version_id} was not found "
                                                 "in this key vault."), {}
        if not version.enabled:
            return 403, _error("Forbidden", "Operation get is not allowed on a disabled secret."), {}
        return 200, self._bundle(name, version, base), {}

    def _update(self, name: str, version_id: str, body: bytes, base: str
                ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        secret = self._secrets.get(name)
        version = next((v for v in secret.versions if v.id == version_id), None) if secret else None
        if version is None:
            return 404, _error("SecretNotFound", f"A secret with (name/id) {name}/{version_id} was not found."), {}
        payload = json.loads(body or b"{}")
        attrs = payload.get("attributes") or {}
        if "enabled" in attrs:
            version.enabled = bool(attrs["enabled"])
        if "tags" in payload:
            version.tags = payload["tags"]
        version.updated = int(time.time())
        return 200, self._bundle(name, version, base, with_value=False), {}

    def _versions(self, name: str, base: str) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        secret = self._secrets.get(name)
        items = [self._bundle(name, v, base, with_value=False) for v in secret.versions] if secret else []
        return 200, {"value": items, "nextLink": None}, {}

    def _delete(self, name: str, base: str) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        secret = self._secrets.pop(name, None)
        if secret is None:
            return 404, _error("SecretNotFound", f"A secret with (name/id) {name} was not found in this key vault."), {}
        now = int(time.time())
        gone = Deleted(secret=secret, deleted_date=now, scheduled_purge_date=now + RETENTION_DAYS * 86400)
        self._deleted[name] = gone
        return 200, self._deleted_bundle(name, gone, base), {}

    def _list(self, base: str, query: dict[str, str], *, deleted: bool
              ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        try:
            size = min(int(query.get("maxresults", PAGE_SIZE)), PAGE_SIZE)
            skip = int(query.get("$skiptoken", "0"))
        except ValueError:
            return 400, _error("BadParameter", "maxresults and $skiptoken must be integers."), {}
        names = sorted(self._deleted if deleted else self._secrets)
        page = names[skip:skip + size]
        if deleted:
            items = [self._deleted_bundle(n, self._deleted[n], base, item=True) for n in page]
        else:
            items = [self._item(n, self._secrets[n].versions[-1], base) for n in page]
        next_link = None
        if skip + size < len(names):
            params = {"api-version": query["api-version"], "maxresults": size, "$skiptoken": skip + size}
            next_link = f"{base}/{'deletedsecrets' if deleted else 'secrets'}?{urlencode(params)}"
        return 200, {"value": items, "nextLink": next_link}, {}

    # -- bundles -----------------------------------------------------------------------------------

    def _attributes(self, version: Version) -> dict[str, Any]:
        return {"enabled": version.enabled, "created": version.created, "updated": version.updated,
                "recoveryLevel": "Recoverable" if self.purge_protection else "Recoverable+Purgeable",
                "recoverableDays": RETENTION_DAYS}

    def _bundle(self, name: str, version: Version, base: str, *, with_value: bool = True) -> dict[str, Any]:
        bundle: dict[str, Any] = {"id": f"{base}/secrets/{name}/{version.id}", "attributes": self._attributes(version)}
        if with_value:
            bundle["value"] = version.value
        if version.content_type:
            bundle["contentType"] = version.content_type
        if version.tags:
            bundle["tags"] = version.tags
        return bundle

    def _item(self, name: str, version: Version, base: str) -> dict[str, Any]:
        item = self._bundle(name, version, base, with_value=False)
        item["id"] = f"{base}/secrets/{name}"
        return item

    def _deleted_bundle(self, name: str, gone: Deleted, base: str, *, item: bool = False) -> dict[str, Any]:
        latest = gone.secret.versions[-1]
        bundle = self._item(name, latest, base) if item else self._bundle(name, latest, base, with_value=False)
        bundle.update(recoveryId=f"{base}/deletedsecrets/{name}", deletedDate=gone.deleted_date,
                      scheduledPurgeDate=gone.scheduled_purge_date)
        return bundle

    def dispatch(self, method: str, path: str, headers: dict[str, str], body: bytes
                 ) -> tuple[int, dict[str, str], bytes]:
        base = f"https://{headers.get('host', '')}"
        try:
            status, payload, extra = self.handle(method, path, headers, body, base)
        except Exception as exc:  # a simulator bug must show as a 500, as a service fault would
            status, payload, extra = 500, _error("InternalServerError", type(exc).__name__), {}
        self.requests.append(RequestRecord(method, urlsplit(path).path, "authorization" in headers, status))
        out = dict(extra)
        if payload is not None:
            out["Content-Type"] = "application/json; charset=utf-8"
        out["x-ms-keyvault-service-version"] = "1.9.0.0"
        return status, out, b"" if payload is None else json.dumps(payload).encode()


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class _JwksKeys:
    """Signing keys of the identity provider, fetched once and again on an unknown key id."""

    def __init__(self, jwks_url: str, ca_bundle: str | None) -> None:
        self.url, self.ca_bundle = jwks_url, ca_bundle
        self._keys: dict[str, Any] = {}
        self._lock = threading.Lock()

    def key_for(self, token: str) -> Any:
        kid = jwt.get_unverified_header(token).get("kid")
        with self._lock:
            if kid not in self._keys:
                self._refresh()
            return self._keys[kid]

    def _refresh(self) -> None:
        import requests

        session = requests.Session()
        session.trust_env = False
        document = session.get(self.url, verify=self.ca_bundle or True, timeout=10).json()
        self._keys = {k.get("kid"): jwt.PyJWK(k).key for k in document.get("keys", [])}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Key Vault (secrets) simulator over HTTPS")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--tenant", default="00000000-0000-0000-0000-000000000001")
    parser.add_argument("--jwks-url", help="check token signatures against this identity provider's keys")
    parser.add_argument("--ca", help="CA bundle for fetching the JWKS (default: ca.pem beside --cert)")
    args = parser.parse_args(argv)
    ca = args.ca or (str(args.cert.parent / "ca.pem") if (args.cert.parent / "ca.pem").exists() else None)
    sim = KeyVaultSimulator(args.cert, args.key, tenant_id=args.tenant, jwks_url=args.jwks_url, ca_bundle=ca,
                            port=args.port).start()
    return serve_until_terminated(sim, lambda url: print(f"ready {url}", flush=True))


if __name__ == "__main__":
    raise SystemExit(main())
