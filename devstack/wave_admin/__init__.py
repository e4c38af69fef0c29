"""Wave's "Integrations → Microsoft Dynamics 365" admin page and the slice of Wave's backend behind it.

The page (assets/, plain HTML/CSS/JS) calls only `/integrations/dynamics365/<account>/api/...` on Wave's
own origin. This backend plays Wave's part of the connect contract (README "Connecting Dynamics"): it has
signed-in Wave users (a session cookie, HttpOnly, SameSite=Strict), refuses every API call without a
session, for an account the user does not administer, or (for POSTs) from another origin, and forwards
the rest server-side to the integration's public connections API, adding the function key and what only
Wave knows: the plan, the signed-in user (`initiated_by`, `confirmed_by`) and the return URL. The browser
never sees the key. When the browser comes back from Microsoft with `?dynamics=confirm&completion=...`,
the page posts the code here and Wave confirms it for its signed-in user: a browser without a Wave
session (say, someone who was sent an authorize URL) cannot finish a connection.

It is framework-neutral: `AdminPage.handle(method, path, headers, body)` returns a `(status, headers,
body)` triple, or None for a path that is not the page's, so the Wave simulator mounts it with one call.

    GET  /integrations/login?next=<page>                  Wave's sign-in form (the stand-in: email only)
    POST /integrations/login   (form: email, next)        sets the session cookie, back to <page>
    POST /integrations/logout
    GET  /integrations/dynamics365/<account>              the page
    GET  /integrations/assets/<file>                      its CSS/JS
    GET  /integrations/dynamics365/<account>/api/status   -> GET  /api/connections/<account> (+ wave_user)
    POST /integrations/dynamics365/<account>/api/connect  -> POST /api/connections/<account>/connect
    POST /integrations/dynamics365/<account>/api/confirm  -> POST /api/connections/<account>/confirm
    POST .../api/disconnect | .../api/sync | .../api/failures/retry  -> the same-named routes
"""

from __future__ import annotations

import html
import json
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import requests

ASSETS = Path(__file__).resolve().parent / "assets"
PAGE_PREFIX = "/integrations/dynamics365/"
ASSET_PREFIX = "/integrations/assets/"
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8"}
_ACCOUNT = r"(?P<account>[A-Za-z0-9_-]{1,64})"
_PAGE_RE = re.compile(rf"^{re.escape(PAGE_PREFIX)}{_ACCOUNT}/?$")
_ACTIONS = "status|connect|confirm|disconnect|sync|failures/retry"
_API_RE = re.compile(rf"^{re.escape(PAGE_PREFIX)}{_ACCOUNT}/api/(?P<action>{_ACTIONS})$")
_FORWARD = {  # page action -> (method, connections API path suffix)
    ("GET", "status"): ("GET", ""),
    ("POST", "connect"): ("POST", "/connect"),
    ("POST", "confirm"): ("POST", "/confirm"),
    ("POST", "disconnect"): ("POST", "/disconnect"),
    ("POST", "sync"): ("POST", "/sync"),
    ("POST", "failures/retry"): ("POST", "/failures/retry"),
}

LOGIN_PATH = "/integrations/login"
LOGOUT_PATH = "/integrations/logout"
COOKIE = "wave_session"
# Wave's pages never leak a completion code through Referer to another origin, and are never framed.
# (`same-origin`, not `no-referrer`: under no-referrer browsers send `Origin: null` on the page's own POSTs,
# https://fetch.spec.whatwg.org/#origin-header, and the Origin check below would refuse them.)
_PAGE_HEADERS = {"Referrer-Policy": "same-origin", "X-Frame-Options": "DENY",
                 "Content-Security-Policy": "frame-ancestors 'none'", "Cache-Control": "no-store"}

Response = tuple[int, dict[str, str], bytes]


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> Response:
    return status, {"Content-Type": "application/json", "Cache-Control": "no-store", **(headers or {})}, \
        json.dumps(body).encode()


def _error(status: int, code: str, message: str) -> Response:
    return _json(status, {"error": {"code": code, "message": message}})


def _cookie(headers: dict[str, str], name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


_LOGIN_FORM = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign in · Wave</title>
<link rel="stylesheet" href="/integrations/assets/dynamics365.css"></head><body>
<header class="topbar"><span class="logo">wave</span><nav>Sign in</nav></header><main><section class="card">
<h1>Sign in to Wave</h1>{problem}<form method="post" action="{action}">
<label for="email">Work email</label><input id="email" name="email" type="email" value="{email}" required>
<input type="hidden" name="next" value="{next}"><div class="actions">
<button id="sign-in" class="primary" type="submit">Sign in</button></div></form></section></main></body></html>
"""


@dataclass
class AdminPage:
    """`connections_api`: the integration's base URL (e.g. the dev host's http://127.0.0.1:N);
    `public_url`: this page's origin as the browser sees it (for the return URL after sign-in)."""

    connections_api: str
    function_key: str = field(repr=False)
    public_url: str
    admin_email: str = "admin@wave.test"  # the sign-in form's suggestion
    # Wave users and the accounts each administers (None: every account); the stand-in's user directory.
    admins: dict[str, set[str] | None] = field(default_factory=dict)
    plan_of: Callable[[str], str] = lambda _account: "teams"
    # Wave knows how many contacts an account has; the page shows backfill progress against it.
    contacts_total: Callable[[str], int | None] = lambda _account: None
    timeout: float = 15.0
    _sessions: dict[str, str] = field(default_factory=dict, repr=False)  # session id -> user email
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.admins.setdefault(self.admin_email, None)

    def add_admin(self, email: str, accounts: set[str] | None) -> None:
        with self._lock:
            self.admins[email] = accounts

    def sign_in(self, email: str) -> str | None:
        """A new session id for a known Wave user, else None."""
        with self._lock:
            if email not in self.admins:
                return None
            sid = secrets.token_urlsafe(24)
            self._sessions[sid] = email
            return sid

    def user(self, headers: dict[str, str]) -> str | None:
        sid = _cookie(headers, COOKIE)
        with self._lock:
            return self._sessions.get(sid) if sid else None

    def administers(self, email: str, account: str) -> bool:
        with self._lock:
            accounts = self.admins.get(email, set())
        return accounts is None or account in accounts

    def same_origin(self, headers: dict[str, str]) -> bool:
        """A POST comes from Wave's own pages: browsers send Origin on every cross-site POST and fetch."""
        return headers.get("origin", "").rstrip("/") == self.public_url.rstrip("/")

    def page_url(self, account_id: str) -> str:
        return f"{self.public_url.rstrip('/')}{PAGE_PREFIX}{account_id}"

    def login_url(self, next_path: str) -> str:
        return f"{self.public_url.rstrip('/')}{LOGIN_PATH}?next={quote(next_path, safe='/')}"

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes = b"") -> Response | None:
        parts = urlsplit(raw_path)
        path = parts.path
        if method == "GET" and path.startswith(ASSET_PREFIX):
            return self._asset(path.removeprefix(ASSET_PREFIX))
        if method == "GET" and _PAGE_RE.match(path):
            return self._asset("index.html")
        if path == LOGIN_PATH:
            return self._login(method, parts.query, headers, body)
        if path == LOGOUT_PATH and method == "POST":
            return self._logout(headers)
        m = _API_RE.match(path)
        if not m:
            return None
        target = _FORWARD.get((method, m["action"]))
        if target is None:
            return _error(405, "method_not_allowed", f"{method} is not allowed here")
        user = self.user(headers)
        if user is None:
            return _error(401, "not_signed_in", "sign in to Wave first")
        if method != "GET" and not self.same_origin(headers):
            return _error(403, "cross_site", "this request did not come from Wave's own pages")
        if not self.administers(user, m["account"]):
            return _error(403, "not_an_admin", f"{user} does not administer this Wave account")
        return self._forward(m["account"], m["action"], target, body, user)

    # -- Wave's sign-in (a stand-in: an email is enough, if Wave knows it) -----------------------------

    def _login(self, method: str, query: str, headers: dict[str, str], body: bytes) -> Response:
        if method == "GET":
            next_path = parse_qs(query).get("next", [""])[0]
            return self._login_form(next_path, "")
        if method != "POST":
            return _error(405, "method_not_allowed", f"{method} is not allowed here")
        if not self.same_origin(headers):
            return _error(403, "cross_site", "this request did not come from Wave's own pages")
        form = parse_qs(body.decode("utf-8", "replace"))
        email = form.get("email", [""])[0].strip()
        next_path = form.get("next", [""])[0]
        sid = self.sign_in(email)
        if sid is None:
            return self._login_form(next_path, f"Wave does not know {email or 'that address'}.", status=401)
        target = next_path if next_path.startswith(PAGE_PREFIX) else "/"  # never an open redirect
        cookie = f"{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict"
        return 303, {"Location": target, "Set-Cookie": cookie, **_PAGE_HEADERS}, b""

    def _login_form(self, next_path: str, problem: str, status: int = 200) -> Response:
        page = _LOGIN_FORM.format(action=LOGIN_PATH, email=html.escape(self.admin_email),
                                  next=html.escape(next_path),
                                  problem=f'<p class="banner error">{html.escape(problem)}</p>' if problem else "")
        return status, {"Content-Type": "text/html; charset=utf-8", **_PAGE_HEADERS}, page.encode()

    def _logout(self, headers: dict[str, str]) -> Response:
        if not self.same_origin(headers):
            return _error(403, "cross_site", "this request did not come from Wave's own pages")
        sid = _cookie(headers, COOKIE)
        with self._lock:
            self._sessions.pop(sid or "", None)
        return _json(200, {"signed_out": True},
                     {"Set-Cookie": f"{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"})

    def _asset(self, name: str) -> Response:
        file = (ASSETS / name).resolve()
        if file.parent != ASSETS or not file.is_file():
            return 404, {"Content-Type": "text/plain"}, b"not found"
        ctype = _CONTENT_TYPES.get(file.suffix, "application/octet-stream")
        return 200, {"Content-Type": ctype, **_PAGE_HEADERS}, file.read_bytes()

    def _forward(self, account: str, action: str, target: tuple[str, str], body: bytes, user: str) -> Response:
        method, suffix = target
        payload: dict[str, object] | None = None
        if method == "POST":
            try:
                given = json.loads(body or b"{}")
            except ValueError:
                return _error(400, "invalid_json", "the request body is not JSON")
            if not isinstance(given, dict):
                return _error(400, "invalid_json", "the request body must be an object")
            # What Wave's backend adds from its own session: never trusted from the browser.
            payload = {}
            if action == "connect":
                payload = {"instance_url": given.get("instance_url"), "auto_sync": bool(given.get("auto_sync")),
                           "plan": self.plan_of(account), "initiated_by": user,
                           "return_url": self.page_url(account)}
            elif action == "confirm":
                payload = {"completion": given.get("completion"), "confirmed_by": user}
            elif action == "disconnect":
                payload = {"disconnected_by": user}
        url = f"{self.connections_api.rstrip('/')}/api/connections/{account}{suffix}"
        try:
            res = requests.request(method, url, json=payload, headers={"x-functions-key": self.function_key},
                                   timeout=self.timeout)
        except requests.RequestException as exc:
            return _error(502, "integration_unreachable",
                          f"the Dynamics 365 integration did not answer ({type(exc).__name__})")
        if action == "status" and res.status_code == 404:
            return _json(200, {"state": "not_connected", "account_id": account, "wave_user": user})
        try:
            data = res.json()
        except ValueError:
            data = {"error": {"code": f"http_{res.status_code}", "message": res.text[:200]}}
        if action == "status" and res.ok and isinstance(data, dict):
            data["wave_contacts_total"] = self.contacts_total(account)
            data["wave_user"] = user
        return _json(res.status_code, data)
