"""The Dataverse simulator process: HTTP(S) server, bearer-token check, service protection, fault
injection, request log and the `/_sim/...` control API. Web API semantics live in api.py."""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import json
import logging
import socket
import ssl
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from devstack.dataverse.api import WebApi
from devstack.dataverse.clock import Clock, Ids
from devstack.dataverse.errors import SimError, not_found
from devstack.dataverse.faults import Fault, Faults
from devstack.dataverse.limits import Limits, ServiceProtection
from devstack.dataverse.protocol import API_PREFIX, Request, Response, SimConfig
from devstack.dataverse.store import AltKey, Caller, Store, StoreConfig

log = logging.getLogger("dataverse_sim")
CONTROL_PREFIX = "/_sim/"
DEFAULT_ADMIN_EMAIL = "admin@sim.local"
_STATUS_MESSAGES = {  # injected status faults: research/dataverse.md §7
    400: ("0x80040203", "Invalid argument."),
    403: ("0x80040220", "The user does not hold the necessary privileges."),
    404: ("0x80040217", "The requested record was not found or you do not have sufficient permissions to view it."),
    412: ("0x80060882", "The version of the existing record doesn't match the RowVersion property provided."),
    429: ("0x80072322", "Number of requests exceeded the limit of 6000 over time window of 300 seconds."),
    500: ("0x80040216", "An unexpected error occurred."),
    502: ("", "Bad Gateway"),
    503: ("", "The service is temporarily unavailable. Please retry later."),
    504: ("", "The operation has timed out."),
}


def _decode_jwt(token: str) -> dict[str, Any] | None:
    """The payload of a JWT, without verifying the signature (the simulator trusts its test tokens)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    return claims if isinstance(claims, dict) else None


def _fault_error(fault: Fault) -> SimError:
    """The documented error of an injected status fault (its code and message unless the fault names them)."""
    code, message = _STATUS_MESSAGES.get(fault.status, ("", "Injected fault"))
    extra = {"Retry-After": str(fault.retry_after)} if fault.status == 429 else {}
    return SimError(fault.status, fault.code if fault.code is not None else code, fault.message or message, extra)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True
    sim: DataverseSimulator

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that connects and leaves before the TLS handshake (the stack's port check) is no error
        if isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class DataverseSimulator:
    """A faithful local Dataverse Web API (research/dataverse.md, simulator fidelity checklist).

    In-process: `sim = DataverseSimulator(...).start()`; `sim.url` is the instance URL (origin),
    `sim.api_url` the Web API root; `sim.stop()`. A separate process: `python -m devstack.dataverse_sim`
    and the `/_sim/...` control API.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        certfile: str | Path | None = None,
        keyfile: str | Path | None = None,
        config: SimConfig | None = None,
        limits: Limits | None = None,
        store_config: StoreConfig | None = None,
        manual_clock: bool = False,
        id_seed: str | None = None,
        fault_seed: int | None = None,
        log_size: int = 100_000,
    ) -> None:
        self.host, self.port = host, port
        self.certfile, self.keyfile = certfile, keyfile
        self.clock = Clock(manual=manual_clock)
        self.ids = Ids(id_seed)
        self.config = config or SimConfig()
        self.store = Store(self.clock, self.ids, store_config or StoreConfig())
        self.protection = ServiceProtection(limits or Limits(), self.clock)
        self.faults = Faults(fault_seed)
        self.api = WebApi(self.store, self.config, lambda: self.url, part_fault=self._part_fault)
        self._log: deque[dict[str, Any]] = deque(maxlen=log_size)
        self._counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        self.internal_errors: list[str] = []  # unexpected exceptions (simulator bugs); tests may assert none
        self._seen_tokens: set[str] = set()
        self._revoked: set[str] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def https(self) -> bool:
        return self.certfile is not None

    @property
    def url(self) -> str:
        return f"{'https' if self.https else 'http'}://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return self.url + API_PREFIX

    @property
    def limits(self) -> Limits:
        return self.protection.limits

    def start(self) -> DataverseSimulator:
        server = _Server((self.host, self.port), _Handler)
        server.sim = self
        if self.https:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.certfile), str(self.keyfile))
            # The handshake runs in the request thread (see _Handler.setup), not in the accept loop.
            server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"dataverse-sim-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.faults.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> DataverseSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control API (in-process; the same operations are served under /_sim/) ------------------

    def add_user(self, email: str, **kwargs: Any) -> dict[str, Any]:
        """Add a systemuser. kwargs: enabled, accessmode, privileges (set of names; default all),
        oid (azureactivedirectoryobjectid), fullname, systemuserid. Returns its public columns."""
        user = self.store.add_user(email, **kwargs)
        return {k: v for k, v in user.items() if k != "privileges"}

    def set_privileges(self, user_id: str, privileges: Iterable[str], depth: str = "Global") -> None:
        with self.store.lock:
            user = self.store.users.get(user_id.lower())
            if user is None:
                raise KeyError(user_id)
            user["privileges"] = {p: depth for p in privileges}

    def set_user(self, user_id: str, *, enabled: bool | None = None, accessmode: int | None = None) -> None:
        with self.store.lock:
            user = self.store.users[user_id.lower()]
            if enabled is not None:
                user["isdisabled"] = not enabled
            if accessmode is not None:
                user["accessmode"] = accessmode

    def add_team(self, name: str) -> dict[str, Any]:
        return dict(self.store.add_team(name))

    def define_key(self, columns: Iterable[str] = ("externaluseridentifier",), name: str = "wave_externalid",
                   status: str = "Active") -> None:
        with self.store.lock:
            self.store.keys = [k for k in self.store.keys if k.name != name]
            self.store.keys.append(AltKey(name, tuple(columns), status))

    def remove_keys(self) -> None:
        with self.store.lock:
            self.store.keys = []

    def set_bulk_messages(self, messages: Iterable[str]) -> None:
        """Which of CreateMultiple/UpdateMultiple/UpsertMultiple the contact table supports."""
        self.config.bulk_messages = set(messages)

    def configure(self, **settings: Any) -> None:
        """Set any field of SimConfig, Limits or StoreConfig by name (e.g. requests=10, window_seconds=3)."""
        for name, value in settings.items():
            for target in (self.config, self.protection.limits, self.store.config):
                if name in {f.name for f in dataclasses.fields(target)}:
                    setattr(target, name, set(value) if name == "bulk_messages" else
                            tuple(value) if isinstance(value, list) else value)
                    break
            else:
                raise KeyError(f"unknown simulator setting {name!r}")

    def script_faults(self, *faults: Fault) -> None:
        self.faults.script(*faults)

    def set_fault_rates(self, rates: list[tuple[Fault, float]]) -> None:
        self.faults.set_rates(rates)

    def clear_faults(self) -> None:
        self.faults.clear()

    def release_held(self) -> None:
        self.faults.release()

    def revoke_tokens(self) -> None:
        """Every token presented so far now answers 401, as an expired token would (a fresh one works)."""
        with self._counter_lock:
            self._revoked |= self._seen_tokens

    def rows(self, entity_set: str = "contacts") -> list[dict[str, Any]]:
        return self.store.snapshot()[entity_set]

    def contacts_by_external_id(self, external_id: str) -> list[dict[str, Any]]:
        return [r for r in self.rows() if r.get("externaluseridentifier") == external_id]

    def request_log(self) -> list[dict[str, Any]]:
        with self._counter_lock:
            return list(self._log)

    def counters(self) -> dict[str, Any]:
        with self._counter_lock:
            counters: dict[str, Any] = dict(self._counters)
        counters["faults_injected"] = self.faults.injected
        counters["in_flight"] = self.protection.in_flight()
        counters["entitlement"] = self.protection.entitlement()
        counters["contacts"] = len(self.store.contacts)
        return counters

    def in_flight(self) -> int:
        return self.protection.in_flight()

    def reset(self) -> None:
        """Forget contacts, keys, the log, counters, limit windows and faults; users stay."""
        with self.store.lock:
            self.store.clear_contacts()
            self.store.keys = []
        with self._counter_lock:
            self._log.clear()
            self._counters.clear()
        self.protection.reset()
        self.faults.clear()

    # -- request handling ------------------------------------------------------------------------

    def _part_fault(self, method: str, url: str) -> SimError | None:
        """The error a scripted `in_batch` fault gives one request inside a $batch, if one applies."""
        fault = self.faults.pick(method, url, in_batch=True)
        return _fault_error(fault) if fault is not None else None

    def _count(self, **increments: int) -> None:
        with self._counter_lock:
            self._counters.update(increments)

    def _challenge(self, message: str, error: str | None = None) -> SimError:
        value = f"Bearer authorization_uri={self.config.authorization_uri}, resource_id={self.url}/"
        if error:
            value += f', error="{error}", error_description="{message}"'
        return SimError(401, "", message, {"WWW-Authenticate": value})

    def _default_user(self) -> dict[str, Any]:
        with self.store.lock:
            for user in self.store.users.values():
                if user["internalemailaddress"] == DEFAULT_ADMIN_EMAIL:
                    return user
            if not self.config.auto_create_users:
                raise self._challenge("The token has no oid claim.", "invalid_token")
            return self.store.add_user(DEFAULT_ADMIN_EMAIL, fullname="Simulator Admin")

    def authenticate(self, headers: dict[str, str]) -> tuple[Caller, dict[str, Any]]:
        """(effective caller, the token's own user). Raises the 401/403 the service would answer."""
        auth = headers.get("authorization", "")
        if not auth[:7].lower() == "bearer " or not auth[7:].strip():
            raise self._challenge("Authorization header with a bearer token is required.")
        token = auth[7:].strip()
        claims = _decode_jwt(token)
        if claims is None:
            raise self._challenge("The access token is malformed.", "invalid_token")
        fingerprint = hashlib.sha256(token.encode()).hexdigest()
        with self._counter_lock:
            self._seen_tokens.add(fingerprint)
            revoked = fingerprint in self._revoked
        exp = claims.get("exp")
        if revoked or (isinstance(exp, (int, float)) and exp < time.time()):
            raise self._challenge("The access token expired.", "invalid_token")
        if self.config.check_audience and str(claims.get("aud", "")).rstrip("/") != self.url:
            raise self._challenge(f"The access token audience is not {self.url}.", "invalid_token")
        oid = claims.get("oid")
        if oid:
            with self.store.lock:  # concurrent first requests of one user must not create it twice
                user = self.store.user_by_oid(str(oid))
                if user is None:
                    if not self.config.auto_create_users:
                        raise SimError(403, "0x80072560", "The user is not a member of the organization.")
                    email = next((claims[c] for c in ("preferred_username", "upn", "email", "unique_name")
                                  if isinstance(claims.get(c), str)), f"{oid}@sim.local")
                    user = self.store.add_user(email, oid=str(oid), fullname=claims.get("name"))
        else:
            user = self._default_user()
        if user["isdisabled"]:
            raise SimError(403, "0x80072560", "The user is not a member of the organization (the user is disabled).")
        caller = Caller(user, duplicate_detection=headers.get("mscrm.suppressduplicatedetection", "").lower()
                        == "false")
        target = None
        if headers.get("callerobjectid"):
            target = self.store.user_by_oid(headers["callerobjectid"])
            if target is None:
                raise not_found("systemuser", headers["callerobjectid"])
        elif headers.get("mscrmcallerid"):
            target = self.store.users.get(headers["mscrmcallerid"].lower())
            if target is None:
                raise not_found("systemuser", headers["mscrmcallerid"])
        if target is not None and target is not user:
            caller.require("prvActOnBehalfOfAnotherUser", "systemuser")
            caller = Caller(target, on_behalf_of=user, duplicate_detection=caller.duplicate_detection)
        return caller, user

    def serve_api(self, method: str, target: str, headers: dict[str, str], body: bytes,
                  hold: Fault | None = None) -> Response:
        """One Web API request after faults: auth, limits, semantics, execution cost, headers.

        `hold` (a slow or hold fault) keeps the admitted request in flight first; the time held counts
        as execution time, as a slow request's would.
        """
        try:
            if len(target) > self.config.max_url_length:
                raise SimError(414, "", "The request URL is too long.")
            caller, token_user = self.authenticate(headers)
            ticket = self.protection.admit(token_user["systemuserid"])
        except SimError as err:
            if err.status == 429:
                self._count(throttled=1, sent_during_penalty=int(err.during_penalty), **{f"throttled_{err.code}": 1})
            answer = Response.of_error(err)
            answer.during_penalty = err.during_penalty
            return answer
        exec_ms = 0.0
        try:
            if hold is not None:
                held = time.monotonic()
                if hold.kind == "hold":
                    self.faults.wait_for_release(hold.delay)
                else:
                    self._stopping.wait(hold.delay)
                exec_ms += (time.monotonic() - held) * 1000
            request = Request(method, target.split(API_PREFIX, 1)[1], headers, body)
            try:
                resp = self.api.handle(caller, request)
            except Exception as exc:  # a simulator bug: answer like the service does, keep it for tests
                log.exception("dataverse simulator failed on %s %s", method, target)
                self.internal_errors.append(f"{method} {target}: {type(exc).__name__}: {exc}")
                resp = Response.of_error(SimError(500, "0x80040216", "An unexpected error occurred."))
            cfg = self.config
            exec_ms += (cfg.base_ms * (1 + resp.inner_requests) + cfg.per_record_ms * resp.writes
                       + cfg.per_read_row_ms * resp.reads)
            if cfg.sleep_fraction > 0:
                self._stopping.wait(exec_ms / 1000 * cfg.sleep_fraction)
        finally:
            rate_headers = self.protection.finish(ticket, exec_ms)
        # a $batch that stopped at a failing part did run (and write) the parts before it
        operations = resp.writes + (1 if method == "GET" and resp.status < 400 else 0)
        self.protection.count_operations(token_user["systemuserid"], operations)
        self._count(writes=resp.writes, reads=resp.reads, batch_inner_requests=resp.inner_requests,
                    execution_ms=int(exec_ms))
        resp.headers.update(rate_headers)
        resp.exec_ms, resp.user = exec_ms, token_user["systemuserid"]
        return resp

    def record(self, method: str, path: str, status: int, **extra: Any) -> None:
        entry = {"t": self.clock.now(), "method": method, "path": path, "status": status, **extra}
        with self._counter_lock:
            self._log.append(entry)
            self._counters.update({"requests": 1, f"status_{status}": 1})

    # -- HTTP control API ------------------------------------------------------------------------

    def control(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        parts = urlsplit(path)
        command = parts.path[len(CONTROL_PREFIX):].strip("/")
        query = dict(parse_qsl(parts.query))
        body = body or {}
        if method == "GET" and command.startswith("rows/"):
            return 200, self.rows(command.split("/", 1)[1])
        if method == "GET" and command == "log":
            log = self.request_log()
            return 200, log[-int(query["limit"]):] if "limit" in query else log
        if method == "GET" and command == "counters":
            return 200, self.counters()
        if method == "GET" and command == "config":
            return 200, {"config": {**dataclasses.asdict(self.config),
                                    "bulk_messages": sorted(self.config.bulk_messages)},
                         "limits": dataclasses.asdict(self.limits),
                         "store": dataclasses.asdict(self.store.config), "url": self.url}
        if method == "POST" and command == "users":
            if "privileges" in body:
                body["privileges"] = set(body["privileges"])
            return 201, self.add_user(body.pop("email"), **body)
        if method == "POST" and command.startswith("users/") and command.endswith("/privileges"):
            self.set_privileges(command.split("/")[1], body["privileges"], body.get("depth", "Global"))
            return 200, {}
        if method == "POST" and command.startswith("users/") and command.count("/") == 1:
            self.set_user(command.split("/")[1], enabled=body.get("enabled"), accessmode=body.get("accessmode"))
            return 200, {}
        if method == "POST" and command == "keys":
            self.define_key(body.get("columns", ["externaluseridentifier"]), body.get("name", "wave_externalid"),
                            body.get("status", "Active"))
            return 200, {}
        if method == "DELETE" and command == "keys":
            self.remove_keys()
            return 200, {}
        if method == "POST" and command == "config":
            self.configure(**body)
            return 200, {}
        if method == "POST" and command == "faults":
            self.script_faults(*(Fault(**f) for f in body.get("script", [])))
            if "rates" in body:
                self.set_fault_rates([(Fault(**r["fault"]), float(r["rate"])) for r in body["rates"]])
            return 200, {"pending": self.faults.pending()}
        if method == "POST" and command == "faults/clear":
            self.clear_faults()
            return 200, {}
        if method == "POST" and command == "faults/release":
            self.release_held()
            return 200, {}
        if method == "POST" and command == "revoke-tokens":
            self.revoke_tokens()
            return 200, {}
        if method == "POST" and command == "reset":
            self.reset()
            return 200, {}
        if method == "POST" and command == "clock/advance":
            self.clock.advance(float(body["seconds"]))
            return 200, {"now": self.clock.now()}
        return 404, {"error": f"unknown control command {method} /_sim/{command}"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "DataverseSimulator/1.0"
    disable_nagle_algorithm = True  # headers and body go out in separate writes; avoid 40 ms delayed-ACK stalls
    server: _Server

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.settimeout(30)
            self.connection.do_handshake()
            self.connection.settimeout(None)

    def handle(self) -> None:
        with contextlib.suppress(ssl.SSLError, ConnectionError, TimeoutError):
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # the simulator keeps its own request log

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PATCH = do_DELETE = do_PUT = do_GET

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _serve(self) -> None:
        sim = self.server.sim
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        method, path = self.command, self.path
        if path.startswith(CONTROL_PREFIX):
            try:
                status, data = sim.control(method, path, json.loads(body) if body else None)
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                status, data = 400, {"error": f"{type(exc).__name__}: {exc}"}
            self._send(status, {"Content-Type": "application/json"}, json.dumps(data, default=str).encode())
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        started = time.monotonic()
        if not urlsplit(path).path.startswith(API_PREFIX):
            resp = Response.of_error(SimError(404, "0x80060888", f"Resource not found for the segment '{path}'."))
        else:
            fault = sim.faults.pick(method, path)
            if fault is not None and fault.kind in ("drop", "timeout"):
                sim.record(method, path, 0, fault=fault.kind)
                if fault.kind == "timeout":
                    sim._stopping.wait(fault.delay)
                self._drop()
                return
            if fault is not None and fault.kind in ("slow", "hold"):
                resp = sim.serve_api(method, path, headers, body, hold=fault)
            elif fault is not None and fault.kind == "token_expired":
                resp = Response.of_error(sim._challenge("The access token expired.", "invalid_token"))
            elif fault is not None:
                resp = Response.of_error(_fault_error(fault))
            else:
                resp = sim.serve_api(method, path, headers, body)
        resp.headers.setdefault("OData-Version", "4.0")
        resp.headers["x-ms-dop-hint"] = str(sim.config.dop_hint)
        request_id = str(uuid.uuid4())
        resp.headers["REQ_ID"] = request_id
        resp.headers["x-ms-service-request-id"] = request_id
        error_code = ""
        if resp.status >= 400 and resp.headers.get("Content-Type", "").startswith("application/json"):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                error_code = json.loads(resp.body)["error"]["code"]
        sim.record(method, path, resp.status, code=error_code, user=resp.user,
                   writes=resp.writes, inner=resp.inner_requests, exec_ms=resp.exec_ms,
                   seconds=round(time.monotonic() - started, 4),
                   **({"retry_after": resp.headers.get("Retry-After"), "during_penalty": resp.during_penalty}
                      if resp.status == 429 else {}),
                   **({"ids": list(resp.written)} if resp.written else {}))
        self._send(resp.status, resp.headers, resp.body)


__all__ = ["DataverseSimulator"]
