"""A local stand-in for the Azure Functions host (Core Tools cannot be installed here).

It discovers every function from `function_app.app` itself, serves the HTTP triggers under /api/
(checking function keys for FUNCTION-level routes), and drives the queue triggers from Azurite with
host.json semantics: base64 decoding, dequeue_count, a peek-lock lease renewed while the function
runs, visibilityTimeout after a failure, a move to `<queue>-poison` after maxDequeueCount, and
batchSize/newBatchThreshold concurrency per function. Non-HTTP functions (timers) run on demand
through the host's admin API, `POST /admin/functions/<name>` with the master key, as in Azure.

    python -m devstack.devhost --port 7071 [--settings local.settings.json]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import azure.functions as func
from azure.core.exceptions import HttpResponseError
from azure.functions.queue import QueueMessage
from azure.functions.timer import TimerRequest
from azure.storage.queue import QueueClient

from core.log import Timer, outcome
from core.storage import ensure_queue
from devstack.http_server import make_server

log = logging.getLogger("devhost")
ROOT = Path(__file__).resolve().parent.parent


def _timespan(value: str | None, default: float) -> float:
    """host.json TimeSpan ("hh:mm:ss[.fff]") in seconds."""
    if not value:
        return default
    hours, minutes, seconds = value.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


@dataclass(frozen=True)
class QueueOptions:
    max_polling_interval: float = 60.0
    visibility_timeout: float = 0.0
    batch_size: int = 16
    new_batch_threshold: int = 8
    max_dequeue_count: int = 5
    base64: bool = True

    @classmethod
    def from_host_json(cls, host: dict[str, Any]) -> QueueOptions:
        q = host.get("extensions", {}).get("queues", {})
        batch = int(q.get("batchSize", 16))
        return cls(
            max_polling_interval=_timespan(q.get("maxPollingInterval"), 60.0),
            visibility_timeout=_timespan(q.get("visibilityTimeout"), 0.0),
            batch_size=batch,
            new_batch_threshold=int(q.get("newBatchThreshold", batch // 2)),
            max_dequeue_count=int(q.get("maxDequeueCount", 5)),
            base64=q.get("messageEncoding", "base64") == "base64",
        )


@dataclass(frozen=True)
class HttpRoute:
    name: str
    pattern: re.Pattern[str]
    methods: frozenset[str] | None
    auth_level: str
    arg_name: str
    handler: Callable[..., func.HttpResponse]


@dataclass(frozen=True)
class QueueFunction:
    name: str
    queue_name: str
    connection: str
    arg_name: str
    handler: Callable[..., Any]


@dataclass(frozen=True)
class OtherFunction:
    name: str
    trigger_type: str
    arg_name: str
    handler: Callable[..., Any]


def _route_regex(template: str) -> re.Pattern[str]:
    parts = []
    for segment in template.strip("/").split("/"):
        m = re.fullmatch(r"\{(\w+)(?::\w+)?(\?)?\}", segment)
        if m:
            parts.append(f"(?P<{m.group(1)}>[^/]+)" + ("?" if m.group(2) else ""))
        else:
            parts.append(re.escape(segment))
    return re.compile("^" + "/".join(parts) + "/?$", re.IGNORECASE)


def discover(app: func.FunctionApp) -> tuple[list[HttpRoute], list[QueueFunction], list[OtherFunction]]:
    """Read the function graph from the app object, as the Functions host indexes it."""
    functions = getattr(app, "_devhost_functions", None)
    if functions is None:  # get_functions() refuses a second call on the same app
        functions = app.get_functions()
        app._devhost_functions = functions  # type: ignore[attr-defined]
    routes, queues, others = [], [], []
    for fn in functions:
        trigger = fn.get_trigger()
        spec = trigger.get_dict_repr()
        extra = [b for b in fn.get_bindings() if b.name not in (trigger.name, "$return")]
        if extra:
            raise RuntimeError(f"function {fn.get_function_name()}: bindings {extra} are not supported locally")
        name, handler = fn.get_function_name(), fn.get_user_function()
        if spec["type"] == "httpTrigger":
            methods = spec.get("methods")
            routes.append(
                HttpRoute(
                    name=name,
                    pattern=_route_regex(spec.get("route") or name),
                    methods=frozenset(str(getattr(m, "value", m)).upper() for m in methods) if methods else None,
                    auth_level=str(getattr(spec.get("authLevel"), "value", spec.get("authLevel"))).upper(),
                    arg_name=trigger.name,
                    handler=handler,
                )
            )
        elif spec["type"] == "queueTrigger":
            queues.append(QueueFunction(name, spec["queueName"], spec["connection"], trigger.name, handler))
        else:
            others.append(OtherFunction(name, spec["type"], trigger.name, handler))
    return routes, queues, others


class QueuePump:
    """Runs one queue-triggered function the way the host's QueueProcessor does."""

    def __init__(self, fn: QueueFunction, connection_string: str, options: QueueOptions, lease_seconds: int):
        self.fn, self.options, self.lease = fn, options, lease_seconds
        self.queue = QueueClient.from_connection_string(connection_string, fn.queue_name)
        self.poison = QueueClient.from_connection_string(connection_string, fn.queue_name + "-poison")
        for q in (self.queue, self.poison):
            ensure_queue(q)
        self._stop = threading.Event()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=options.batch_size + options.new_batch_threshold, thread_name_prefix=f"q-{fn.name}"
        )
        self._thread = threading.Thread(target=self._poll, name=f"poll-{fn.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, wait: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(wait)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _poll(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            with self._lock:
                room = self.options.batch_size + self.options.new_batch_threshold - self._in_flight
                ready = self._in_flight <= self.options.new_batch_threshold
            if not ready or room <= 0:
                self._stop.wait(0.05)
                continue
            try:
                batch = list(
                    self.queue.receive_messages(
                        messages_per_page=min(self.options.batch_size, room, 32),
                        max_messages=min(self.options.batch_size, room, 32),
                        visibility_timeout=self.lease,
                    )
                )
            except Exception as exc:  # storage hiccup: keep polling, as the host does
                log.warning("devhost: polling %s failed: %s", self.fn.queue_name, exc)
                batch = []
            if not batch:
                self._stop.wait(delay)
                delay = min(delay * 2, self.options.max_polling_interval)
                continue
            delay = 0.1
            for message in batch:
                with self._lock:
                    self._in_flight += 1
                self._pool.submit(self._run, message)

    def _run(self, message: Any) -> None:
        timer = Timer()
        lease = _LeaseKeeper(self.queue, message, self.lease)
        try:
            body = self._decode(message.content)
            self.fn.handler(
                **{
                    self.fn.arg_name: QueueMessage(
                        id=message.id,
                        body=body,
                        dequeue_count=message.dequeue_count,
                        expiration_time=message.expires_on,
                        insertion_time=message.inserted_on,
                        time_next_visible=message.next_visible_on,
                        pop_receipt=message.pop_receipt,
                    )
                }
            )
        except Exception as exc:
            receipt = lease.stop()
            self._fail(message, receipt, exc, timer)
        else:
            receipt = lease.stop()
            self._settle(lambda: self.queue.delete_message(message.id, receipt))
            outcome(log, "queue", "completed", function=self.fn.name, message_id=message.id,
                    dequeue_count=message.dequeue_count, ms=timer.ms)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _decode(self, content: str) -> bytes:
        if not self.options.base64:
            return content.encode()
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("message is not valid base64 (host.json messageEncoding is base64)") from exc

    def _fail(self, message: Any, receipt: str, exc: Exception, timer: Timer) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if message.dequeue_count >= self.options.max_dequeue_count:
            self.poison.send_message(message.content)
            self._settle(lambda: self.queue.delete_message(message.id, receipt))
            outcome(log, "queue", "poisoned", level=logging.ERROR, function=self.fn.name,
                    message_id=message.id, dequeue_count=message.dequeue_count, error=error, ms=timer.ms)
        else:
            self._settle(lambda: self.queue.update_message(
                message.id, receipt, visibility_timeout=int(self.options.visibility_timeout)))
            outcome(log, "queue", "failed", level=logging.WARNING, function=self.fn.name,
                    message_id=message.id, dequeue_count=message.dequeue_count, error=error, ms=timer.ms)

    @staticmethod
    def _settle(action: Callable[[], Any]) -> None:
        try:
            action()
        except HttpResponseError as exc:  # lease lost (another consumer has it now): nothing to settle
            log.warning("devhost: could not settle message: %s", exc)


class _LeaseKeeper:
    """Renews a message's invisibility while its function runs, like the host's peek-lock."""

    def __init__(self, queue: QueueClient, message: Any, lease: int) -> None:
        self.queue, self.message, self.lease = queue, message, lease
        self.receipt = message.pop_receipt
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._renew, daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._done.wait(self.lease / 2):
            with self._lock:
                if self._done.is_set():
                    return
                try:
                    updated = self.queue.update_message(self.message.id, self.receipt, visibility_timeout=self.lease)
                    self.receipt = updated.pop_receipt
                except HttpResponseError:
                    return

    def stop(self) -> str:
        with self._lock:
            self._done.set()
            return self.receipt


class DevHost:
    """Serves one FunctionApp: HTTP on a local port, queue triggers from Azurite."""

    def __init__(
        self,
        app: func.FunctionApp,
        *,
        connection_strings: dict[str, str],
        function_key: str,
        master_key: str,
        host_json: dict[str, Any] | None = None,
        port: int = 0,
        lease_seconds: int = 600,
    ) -> None:
        self.routes, self.queue_functions, self.other_functions = discover(app)
        self.options = QueueOptions.from_host_json(
            host_json if host_json is not None else json.loads((ROOT / "host.json").read_text())
        )
        self.function_key, self.master_key = function_key, master_key
        self.pumps = [
            QueuePump(fn, connection_strings[fn.connection], self.options, lease_seconds)
            for fn in self.queue_functions
        ]
        self.server = make_server(self.dispatch, "127.0.0.1", port)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="devhost-http", daemon=True)

    def start(self) -> DevHost:
        self._thread.start()
        for pump in self.pumps:
            pump.start()
        return self

    def stop(self) -> None:
        for pump in self.pumps:
            pump.stop()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> DevHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP -------------------------------------------------------------------------------------

    def _key_ok(self, level: str, headers: dict[str, str], query: dict[str, str]) -> bool:
        if level == "ANONYMOUS":
            return True
        given = headers.get("x-functions-key") or query.get("code") or ""
        keys = [self.master_key] if level == "ADMIN" else [self.function_key, self.master_key]
        return any(hmac.compare_digest(given.encode(), k.encode()) for k in keys)

    def dispatch(self, method: str, raw_path: str, headers: dict[str, str], body: bytes
                 ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(raw_path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        path = parts.path
        if path.startswith("/admin/functions/") and method == "POST":
            return self._admin_invoke(path.removeprefix("/admin/functions/"), headers, query, body)
        if not path.startswith("/api/"):
            return 404, {}, b""
        sub = path.removeprefix("/api/")
        matched_path = False
        for route in self.routes:
            m = route.pattern.match(sub)
            if not m:
                continue
            matched_path = True
            if route.methods is not None and method not in route.methods:
                continue
            if not self._key_ok(route.auth_level, headers, query):
                return 401, {}, b""
            request = func.HttpRequest(
                method=method,
                url=f"{self.url}{raw_path}",
                headers=headers,
                params=query,
                route_params={k: v for k, v in m.groupdict().items() if v is not None},
                body=body,
            )
            timer = Timer()
            try:
                response = route.handler(**{route.arg_name: request})
            except Exception as exc:
                log.exception("devhost: function %s raised", route.name)
                outcome(log, "http", "error", level=logging.ERROR, function=route.name, method=method,
                        status=500, error=type(exc).__name__, ms=timer.ms)
                return 500, {}, b""
            out_headers = dict(response.headers)
            if not any(k.lower() == "content-type" for k in out_headers):
                out_headers["Content-Type"] = f"{response.mimetype}; charset={response.charset}"
            outcome(log, "http", "handled", function=route.name, method=method,
                    status=response.status_code, ms=timer.ms)
            return response.status_code, out_headers, response.get_body() or b""
        return (405 if matched_path else 404), {}, b""

    def _admin_invoke(self, name: str, headers: dict[str, str], query: dict[str, str], body: bytes
                      ) -> tuple[int, dict[str, str], bytes]:
        if not self._key_ok("ADMIN", headers, query):
            return 401, {}, b""
        fn = next((f for f in self.other_functions if f.name.lower() == name.lower()), None)
        if fn is None:
            return 404, {}, b""
        arg = TimerRequest(past_due=False) if fn.trigger_type == "timerTrigger" else body
        timer = Timer()
        try:
            fn.handler(**{fn.arg_name: arg})
        except Exception:
            log.exception("devhost: function %s raised", fn.name)
            return 500, {}, b""
        outcome(log, "admin", "invoked", function=fn.name, ms=timer.ms)
        return 202, {}, b""


def load_local_settings(path: Path) -> None:
    """Values from local.settings.json into the environment, without overriding what is set."""
    values = json.loads(path.read_text()).get("Values", {})
    for key, value in values.items():
        os.environ.setdefault(key, str(value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=7071)
    parser.add_argument("--settings", type=Path, help="a local.settings.json to read Values from")
    parser.add_argument("--lease-seconds", type=int, default=int(os.environ.get("DEVHOST_LEASE_SECONDS", "600")))
    args = parser.parse_args(argv)
    if args.settings:
        load_local_settings(args.settings)

    from core.errors import SettingsError
    from core.settings import get_settings

    try:
        get_settings()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from function_app import app

    host = DevHost(
        app,
        connection_strings={"AzureWebJobsStorage": os.environ["AzureWebJobsStorage"]},
        function_key=os.environ.get("DEVHOST_FUNCTION_KEY", "dev-function-key"),
        master_key=os.environ.get("DEVHOST_MASTER_KEY", "dev-master-key"),
        port=args.port,
        lease_seconds=args.lease_seconds,
    ).start()
    log.info("devhost: listening on %s (%d HTTP routes, %d queue triggers, %d other functions)",
             host.url, len(host.routes), len(host.queue_functions), len(host.other_functions))
    stop = threading.Event()
    try:
        import signal

        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
    except KeyboardInterrupt:
        pass
    host.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
