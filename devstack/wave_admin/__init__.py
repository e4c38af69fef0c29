"""Wave's "Integrations → Microsoft Dynamics 365" admin page and the slice of Wave's backend behind it.

The page (assets/, plain HTML/CSS/JS) calls only `/integrations/dynamics365/<account>/api/...` on Wave's
own origin. This backend forwards those calls server-side to the integration's public connections API
(DESIGN §2.3), adding the function key and what Wave's backend knows about the signed-in admin (plan,
user, return URL): the browser never sees the key.

It is framework-neutral: `AdminPage.handle(method, path, body)` returns a `(status, headers, body)`
triple, or None for a path that is not the page's, so the Wave simulator mounts it with one call.

    GET  /integrations/dynamics365/<account>              the page
    GET  /integrations/assets/<file>                      its CSS/JS
    GET  /integrations/dynamics365/<account>/api/status   -> GET  /api/connections/<account>
    POST /integrations/dynamics365/<account>/api/connect  -> POST /api/connections/<account>/connect
    POST .../api/disconnect | .../api/sync | .../api/failures/retry  -> the same-named routes
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests

ASSETS = Path(__file__).resolve().parent / "assets"
PAGE_PREFIX = "/integrations/dynamics365/"
ASSET_PREFIX = "/integrations/assets/"
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8"}
_ACCOUNT = r"(?P<account>[A-Za-z0-9_-]{1,64})"
_PAGE_RE = re.compile(rf"^{re.escape(PAGE_PREFIX)}{_ACCOUNT}/?$")
_ACTIONS = "status|connect|disconnect|sync|failures/retry"
_API_RE = re.compile(rf"^{re.escape(PAGE_PREFIX)}{_ACCOUNT}/api/(?P<action>{_ACTIONS})$")
_FORWARD = {  # page action -> (method, connections API path suffix)
    ("GET", "status"): ("GET", ""),
    ("POST", "connect"): ("POST", "/connect"),
    ("POST", "disconnect"): ("POST", "/disconnect"),
    ("POST", "sync"): ("POST", "/sync"),
    ("POST", "failures/retry"): ("POST", "/failures/retry"),
}

Response = tuple[int, dict[str, str], bytes]


def _json(status: int, body: object) -> Response:
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


@dataclass
class AdminPage:
    """`connections_api`: the integration's base URL (e.g. the dev host's http://127.0.0.1:N);
    `public_url`: this page's origin as the browser sees it (for the return URL after sign-in)."""

    connections_api: str
    function_key: str = field(repr=False)
    public_url: str
    admin_email: str = "admin@wave.test"
    plan_of: Callable[[str], str] = lambda _account: "teams"
    # Wave knows how many contacts an account has; the page shows backfill progress against it.
    contacts_total: Callable[[str], int | None] = lambda _account: None
    timeout: float = 15.0

    def page_url(self, account_id: str) -> str:
        return f"{self.public_url.rstrip('/')}{PAGE_PREFIX}{account_id}"

    def handle(self, method: str, path: str, body: bytes = b"") -> Response | None:
        path = urlsplit(path).path
        if method == "GET" and path.startswith(ASSET_PREFIX):
            return self._asset(path.removeprefix(ASSET_PREFIX))
        if method == "GET" and _PAGE_RE.match(path):
            return self._asset("index.html")
        m = _API_RE.match(path)
        if not m:
            return None
        target = _FORWARD.get((method, m["action"]))
        if target is None:
            return _json(405, {"error": "method_not_allowed", "message": f"{method} is not allowed here"})
        return self._forward(m["account"], m["action"], target, body)

    def _asset(self, name: str) -> Response:
        file = (ASSETS / name).resolve()
        if file.parent != ASSETS or not file.is_file():
            return 404, {"Content-Type": "text/plain"}, b"not found"
        ctype = _CONTENT_TYPES.get(file.suffix, "application/octet-stream")
        return 200, {"Content-Type": ctype, "Cache-Control": "no-store"}, file.read_bytes()

    def _forward(self, account: str, action: str, target: tuple[str, str], body: bytes) -> Response:
        method, suffix = target
        payload = None
        if action == "connect":
            try:
                given = json.loads(body or b"{}")
            except ValueError:
                return _json(400, {"error": "invalid_json", "message": "the request body is not JSON"})
            if not isinstance(given, dict):
                return _json(400, {"error": "invalid_json", "message": "the request body must be an object"})
            # What Wave's backend adds from its own session: never trusted from the browser.
            payload = {
                "instance_url": given.get("instance_url"),
                "auto_sync": bool(given.get("auto_sync")),
                "plan": self.plan_of(account),
                "initiated_by": self.admin_email,
                "return_url": self.page_url(account),
            }
        url = f"{self.connections_api.rstrip('/')}/api/connections/{account}{suffix}"
        try:
            res = requests.request(method, url, json=payload if method == "POST" else None,
                                   headers={"x-functions-key": self.function_key}, timeout=self.timeout)
        except requests.RequestException as exc:
            return _json(502, {"error": "integration_unreachable",
                               "message": f"the Dynamics 365 integration did not answer ({type(exc).__name__})"})
        if action == "status" and res.status_code == 404:
            return _json(200, {"state": "not_connected", "account_id": account})
        try:
            data = res.json()
        except ValueError:
            data = {"error": f"http_{res.status_code}", "message": res.text[:200]}
        if action == "status" and res.ok and isinstance(data, dict):
            data["wave_contacts_total"] = self.contacts_total(account)
        return _json(res.status_code, data)
