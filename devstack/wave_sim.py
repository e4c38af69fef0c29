"""A local stand-in for Wave: contacts per account with versions and team members, the paginated
contacts API of DESIGN §2.2, and a webhook sender that signs events (§2.1) and can duplicate, delay
and reorder them.

In-process:
    sim = WaveSimulator(token="...", secrets=["whsec_..."]).start()
    sim.webhook_url = f"{devhost.url}/api/webhooks/wave"
    event = sim.create_contact("acct_1", first_name="Ada", email="ada@example.com")
    sim.send([event], duplicates=10)

As a process, with a small control API (JSON):
    python -m devstack.wave_sim --port 7081 --token T --secrets s1,s2 [--webhook-url URL]

    GET    /v1/accounts/<acct>/contacts?limit=1..500&cursor=<opaque>   the contacts API (Bearer token)
    GET    /_control/accounts/<acct>/contacts                  every contact, deleted ones too
    POST   /_control/accounts/<acct>/contacts  {fields..., "send": bool}   create, or update when "id" exists
    DELETE /_control/accounts/<acct>/contacts/<id>?send=1       delete
    POST   /_control/accounts/<acct>/seed      {"count": n}     n contacts, no webhooks
    POST   /_control/faults   {"throttle": n, "retry_after": s, "errors": n, "status": 503}
    POST   /_control/webhook  {"url": "..."}                   where webhooks go
    GET    /_control/requests                                   the API request log

Routing is a list of (method, regex, handler) plus mounted handlers `(method, path, headers, body) ->
(status, headers, body) | None` tried before a 404 (the Wave admin page mounts itself that way).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import http.client
import json
import random
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import requests

from devstack.http_server import Served, connection_dropped, serve_until_terminated
from sync.signature import HEADER, signature_header

Response = tuple[int, dict[str, str], bytes]
Handler = Callable[["Request"], Response]
Mounted = Callable[[str, str, dict[str, str], bytes], Response | None]  # (method, path, headers, body)
CONTACT_FIELDS = ("first_name", "last_name", "email", "phone", "company", "job_title", "website", "note")
MAX_LIMIT = 500
DEFAULT_LIMIT = 100


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    params: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(body).encode()


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json(status, {"error": {"code": code, "message": message}}, headers)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def encode_cursor(after: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        doc = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        after = doc["after"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise ValueError("cursor is not one this API issued") from exc
    if not isinstance(after, str):
        raise ValueError("cursor is not one this API issued")
    return after


@dataclass
class Faults:
    throttle: int = 0  # answer the next n API requests with 429
    retry_after: int = 1
    errors: int = 0  # answer the next n API requests with `status`
    status: int = 503


class WebhookSender:
    """Signs and posts events the way Wave does. Timestamps and secrets can be overridden to test
    rejection; events can be duplicated, reordered and delayed."""

    def __init__(self, url: str | None, secrets: Iterable[str], timeout: float = 30.0) -> None:
        self.url, self.secrets, self.timeout = url, list(secrets), timeout
        self._session = requests.Session()
        self._kept = threading.local()  # post(): each thread's own kept connection

    def body(self, event: dict[str, Any]) -> bytes:
        return json.dumps(event, separators=(",", ":")).encode()

    def headers(self, body: bytes, *, timestamp: int | None = None, secrets: Iterable[str] | None = None
                ) -> dict[str, str]:
        stamp = int(time.time()) if timestamp is None else timestamp
        return {"Content-Type": "application/json",
                HEADER: signature_header(body, list(secrets or self.secrets), stamp)}

    def deliver(self, event: dict[str, Any], **kw: Any) -> requests.Response:
        if not self.url:
            raise RuntimeError("webhook_url is not set")
        body = self.body(event)
        return self._session.post(self.url, data=body, headers=self.headers(body, **kw), timeout=self.timeout)

    def post(self, event: dict[str, Any]) -> int:
        """Deliver one event on this thread's kept connection and return the HTTP status: the lean way a
        sender of many webhooks posts them (a burst's poster shares the machine with the app, and requests'
        per-call work cost it more CPU than the app's front spent forwarding). Plain HTTP only."""
        if not self.url:
            raise RuntimeError("webhook_url is not set")
        parts = urlsplit(self.url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"post() speaks plain HTTP; {self.url} is not")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        body = self.body(event)
        conn: http.client.HTTPConnection | None = getattr(self._kept, "conn", None)
        if conn is not None and connection_dropped(conn):
            conn.close()
            conn = None
        if conn is None:
            conn = self._kept.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout)
        try:
            conn.request("POST", target, body=body, headers=self.headers(body))
            response = conn.getresponse()
            response.read()
        except BaseException:
            conn.close()
            self._kept.conn = None
            raise
        return response.status

    def send(self, events: Iterable[dict[str, Any]], *, duplicates: int = 1, order: str = "as_is",
             delay: float = 0.0, rng: random.Random | None = None) -> list[int] | threading.Thread:
        """Deliver every event `duplicates` times, in `order` (as_is | reverse | shuffle).

        With `delay` > 0 the deliveries happen later on a thread (returned, to join); otherwise the
        HTTP statuses are returned in delivery order.
        """
        batch = [e for e in events for _ in range(duplicates)]
        if order == "reverse":
            batch.reverse()
        elif order == "shuffle":
            (rng or random.Random()).shuffle(batch)
        elif order != "as_is":
            raise ValueError(f"unknown order {order!r}")
        if delay > 0:
            thread = threading.Thread(target=lambda: (time.sleep(delay), [self.deliver(e) for e in batch]),
                                      daemon=True)
            thread.start()
            return thread
        return [self.deliver(e).status_code for e in batch]


class WaveSimulator(Served):
    def __init__(self, *, token: str = "wave-api-token", secrets: Iterable[str] = ("whsec_dev",),
                 webhook_url: str | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.token = token
        self.sender = WebhookSender(webhook_url, secrets)
        self.faults = Faults()
        self.requests: list[dict[str, Any]] = []  # the contacts API request log
        self._contacts: dict[str, dict[str, dict[str, Any]]] = {}  # account -> id -> stored contact
        self._deleted: dict[str, dict[str, int]] = {}  # account -> id -> version of the delete
        self._lock = threading.RLock()
        self._counter = 0
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.mounts: list[Mounted] = []
        self._add_routes()
        self._listen(self.dispatch, host, port, "wave-sim")

    @property
    def webhook_url(self) -> str | None:
        return self.sender.url

    @webhook_url.setter
    def webhook_url(self, url: str | None) -> None:
        self.sender.url = url

    # -- contacts ---------------------------------------------------------------------------------

    def _new_id(self) -> str:
        self._counter += 1
        return f"c_{self._counter:07d}_{uuid.uuid4().hex[:6]}"

    def _event(self, account_id: str, kind: str, snapshot: dict[str, Any]) -> dict[str, Any]:
        return {"id": f"evt_{uuid.uuid4().hex}", "type": f"contact.{kind}", "created": int(time.time()),
                "account_id": account_id, "data": {"contact": dict(snapshot)}}

    def create_contact(self, account_id: str, *, id: str | None = None,  # noqa: A002 - Wave's field name
                       team_member: dict | None = None,
                       **fields: Any) -> dict[str, Any]:
        """Create a contact (version 1, or one past its delete); returns the contact.created event."""
        with self._lock:
            contact_id = id or self._new_id()
            version = self._deleted.get(account_id, {}).pop(contact_id, 0) + 1
            contact = {"id": contact_id, "version": version, "updated_at": _now_iso(),
                       **{k: fields.get(k) for k in CONTACT_FIELDS}, "assigned_team_member": team_member}
            self._contacts.setdefault(account_id, {})[contact_id] = contact
            return self._event(account_id, "created", contact)

    def update_contact(self, account_id: str, contact_id: str, **changes: Any) -> dict[str, Any]:
        """Change fields (a full snapshot follows: version + 1); returns the contact.updated event."""
        with self._lock:
            contact = self._contacts[account_id][contact_id]
            for key, value in changes.items():
                if key == "team_member":
                    contact["assigned_team_member"] = value
                elif key in CONTACT_FIELDS:
                    contact[key] = value
                else:
                    raise KeyError(f"unknown contact field {key!r}")
            contact["version"] += 1
            contact["updated_at"] = _now_iso()
            return self._event(account_id, "updated", contact)

    def delete_contact(self, account_id: str, contact_id: str) -> dict[str, Any]:
        with self._lock:
            contact = self._contacts[account_id].pop(contact_id)
            version = contact["version"] + 1
            self._deleted.setdefault(account_id, {})[contact_id] = version
            return self._event(account_id, "deleted", {"id": contact_id, "version": version})

    def put_raw(self, account_id: str, contact: dict[str, Any]) -> None:
        """Store a contact exactly as given (malformed ones too), as the API will serve it."""
        with self._lock:
            self._contacts.setdefault(account_id, {})[str(contact.get("id"))] = contact

    def seed(self, account_id: str, count: int, *, team_member: dict | None = None,
             make: Callable[[int], dict[str, Any]] | None = None) -> list[str]:
        """`count` contacts at once (no webhooks): `make(i)` gives each one's fields (and may give its
        own `team_member`)."""
        ids = []
        for i in range(count):
            fields = make(i) if make else {"first_name": f"First{i}", "last_name": f"Last{i}",
                                           "email": f"contact{i}@example.com", "company": f"Company {i}"}
            member = fields.pop("team_member", team_member)
            event = self.create_contact(account_id, team_member=member, **fields)
            ids.append(event["data"]["contact"]["id"])
        return ids

    def contact(self, account_id: str, contact_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._contacts.get(account_id, {}).get(contact_id)
            return dict(found) if found else None

    def contacts(self, account_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(c) for _, c in sorted(self._contacts.get(account_id, {}).items())]

    def send(self, events: Iterable[dict[str, Any]], **kw: Any) -> list[int] | threading.Thread:
        return self.sender.send(events, **kw)

    def api_requests(self, account_id: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if account_id is None or r["account_id"] == account_id]

    # -- HTTP -------------------------------------------------------------------------------------

    def add_route(self, method: str, pattern: str, handler: Handler) -> None:
        self.routes.append((method, re.compile("^" + pattern + "$"), handler))

    def mount(self, handler: Mounted) -> None:
        self.mounts.append(handler)

    def _add_routes(self) -> None:
        acct = r"(?P<account>[^/]+)"
        self.add_route("GET", rf"/v1/accounts/{acct}/contacts", self._list_contacts)
        self.add_route("GET", rf"/_control/accounts/{acct}/contacts", self._control_list)
        self.add_route("POST", rf"/_control/accounts/{acct}/contacts", self._control_upsert)
        self.add_route("DELETE", rf"/_control/accounts/{acct}/contacts/(?P<contact>[^/]+)", self._control_delete)
        self.add_route("POST", rf"/_control/accounts/{acct}/seed", self._control_seed)
        self.add_route("POST", r"/_control/faults", self._control_faults)
        self.add_route("POST", r"/_control/webhook", self._control_webhook)
        self.add_route("GET", r"/_control/requests", lambda r: _json(200, self.api_requests()))

    def _list_contacts(self, req: Request) -> Response:
        account = req.params["account"]
        status, response = 200, None
        with self._lock:
            auth = req.headers.get("authorization", "")
            if not hmac.compare_digest(auth.encode(), f"Bearer {self.token}".encode()):
                status, response = 401, _error(401, "unauthorized", "missing or invalid bearer token",
                                               {"WWW-Authenticate": "Bearer"})
            elif self.faults.throttle > 0:
                self.faults.throttle -= 1
                status = 429
                response = _error(429, "rate_limited", "too many requests",
                                  {"Retry-After": str(self.faults.retry_after)})
            elif self.faults.errors > 0:
                self.faults.errors -= 1
                status = self.faults.status
                response = _error(status, "server_error", "the contacts API failed")
            self.requests.append({"account_id": account, "query": req.query, "status": status, "at": time.time()})
            if response is not None:
                return response
            try:
                limit = int(req.query.get("limit", DEFAULT_LIMIT))
                if not 1 <= limit <= MAX_LIMIT:
                    raise ValueError
            except ValueError:
                self.requests[-1]["status"] = 400
                return _error(400, "invalid_limit", f"limit must be an integer 1..{MAX_LIMIT}")
            after = ""
            if req.query.get("cursor"):
                try:
                    after = decode_cursor(req.query["cursor"])
                except ValueError as exc:
                    self.requests[-1]["status"] = 400
                    return _error(400, "invalid_cursor", str(exc))
            ordered = sorted((k, c) for k, c in self._contacts.get(account, {}).items() if k > after)
            page = [dict(c) for _, c in ordered[:limit]]
            more = len(ordered) > limit
        next_cursor = encode_cursor(ordered[limit - 1][0]) if more else None
        return _json(200, {"data": page, "next_cursor": next_cursor})

    def _control_list(self, req: Request) -> Response:
        account = req.params["account"]
        with self._lock:
            deleted = [{"id": k, "version": v, "deleted": True} for k, v in self._deleted.get(account, {}).items()]
        return _json(200, {"contacts": self.contacts(account), "deleted": deleted})

    def _maybe_send(self, req: Request, event: dict[str, Any], send: Any) -> Response:
        status = None
        if send or req.query.get("send") in ("1", "true"):
            status = self.sender.deliver(event).status_code
        return _json(200, {"event": event, "webhook_status": status})

    def _control_upsert(self, req: Request) -> Response:
        doc = req.json()
        account = req.params["account"]
        fields = {k: doc.get(k) for k in CONTACT_FIELDS if k in doc}
        team_member = doc.get("assigned_team_member")
        if doc.get("id") and self.contact(account, doc["id"]):
            if "assigned_team_member" in doc:
                fields["team_member"] = team_member
            event = self.update_contact(account, doc["id"], **fields)
        else:
            event = self.create_contact(account, id=doc.get("id"), team_member=team_member, **fields)
        return self._maybe_send(req, event, doc.get("send"))

    def _control_delete(self, req: Request) -> Response:
        try:
            event = self.delete_contact(req.params["account"], req.params["contact"])
        except KeyError:
            return _error(404, "not_found", "no such contact")
        return self._maybe_send(req, event, False)

    def _control_seed(self, req: Request) -> Response:
        ids = self.seed(req.params["account"], int(req.json().get("count", 0)))
        return _json(200, {"ids": ids})

    def _control_faults(self, req: Request) -> Response:
        doc = req.json()
        with self._lock:
            for key in ("throttle", "retry_after", "errors", "status"):
                if key in doc:
                    setattr(self.faults, key, int(doc[key]))
            return _json(200, vars(self.faults))

    def _control_webhook(self, req: Request) -> Response:
        self.webhook_url = req.json().get("url")
        return _json(200, {"url": self.webhook_url})

    def dispatch(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> Response:
        parts = urlsplit(raw_path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        for route_method, pattern, handler in self.routes:
            m = pattern.match(parts.path)
            if m and route_method == method:
                try:
                    return handler(Request(method, parts.path, query, headers, body, m.groupdict()))
                except (ValueError, KeyError, TypeError) as exc:
                    return _error(400, "bad_request", f"{type(exc).__name__}: {exc}")
        for mounted in self.mounts:
            answer = mounted(method, raw_path, headers, body)
            if answer is not None:
                return answer
        return _error(404, "not_found", f"no route for {method} {parts.path}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's command-line options (shared with `python -m devstack.wave_admin`)."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7081)
    parser.add_argument("--token", default="wave-api-token")
    parser.add_argument("--secrets", default="whsec_dev", help="comma-separated webhook signing secrets")
    parser.add_argument("--webhook-url", default=None)


def from_arguments(args: argparse.Namespace) -> WaveSimulator:
    return WaveSimulator(token=args.token, secrets=args.secrets.split(","), webhook_url=args.webhook_url,
                         host=args.host, port=args.port)


def serve_until_interrupted(sim: WaveSimulator, banner: str) -> int:
    return serve_until_terminated(sim.start(), lambda url: print(f"{banner} on {url}", flush=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Wave simulator: contacts API, webhook sender, control API")
    add_arguments(parser)
    return serve_until_interrupted(from_arguments(parser.parse_args(argv)), "wave simulator")

if __name__ == "__main__":
    sys.exit(main())
