"""A local stand-in for the Azure Functions host and its Python worker (Core Tools cannot be installed here).

It discovers every function from `function_app.app` itself, serves the HTTP triggers under /api/
(checking function keys for FUNCTION-level routes), drives the queue triggers from Azurite with
host.json semantics (base64 decoding, dequeue_count, a peek-lock lease renewed while the function
runs, visibilityTimeout after a failure, a move to `<queue>-poison` after maxDequeueCount,
batchSize/newBatchThreshold messages in flight per function) and fires timer functions on their
NCRONTAB schedules; `POST /admin/functions/<name>` with the master key runs one on demand, as in Azure.

`--functions` makes it one instance of a Flex Consumption scale group instead of the whole app: `http`
(every HTTP trigger), a function's name (a queue function scales on its own instances), `timers` (every
timer function), comma-separated; devstack/stack.py runs the app as several such processes.

Like Microsoft's Python worker, it runs every synchronous function (HTTP, queue, timer) on ONE thread
pool of PYTHON_THREADPOOL_THREAD_COUNT threads (unset: min(32, cores + 4)), and `async def` functions on
an event loop instead; so a local run is no more concurrent than the app in Azure.

    python -m devstack.devhost --port 7071 [--settings local.settings.json] [--functions http,timers]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import inspect
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qsl, unquote, urlsplit

import azure.functions as func
from azure.core.exceptions import HttpResponseError
from azure.functions.queue import QueueMessage
from azure.functions.timer import TimerRequest
from azure.storage.queue import QueueClient

from core.log import Timer, outcome
from core.storage import ensure_queue
from devstack.http_server import Served, serve_until_terminated
from devstack.ncrontab import Schedule, ScheduleError

log = logging.getLogger("devhost")
ROOT = Path(__file__).resolve().parent.parent
THREAD_COUNT_SETTING = "PYTHON_THREADPOOL_THREAD_COUNT"
# The settings the app is designed to run with; infra/app/function.bicep sets the same thread count
# (tests/test_infra.py keeps the two equal), and the local stack and the tests' dev host read it from here.
DESIGN_SETTINGS = ROOT / "local.settings.example.json"


def worker_thread_count(environ: Mapping[str, str]) -> int:
    """The size of the Python worker's pool for synchronous functions.

    The worker reads PYTHON_THREADPOOL_THREAD_COUNT and, when it is unset, not an integer or below 1,
    leaves max_workers to ThreadPoolExecutor's default, min(32, cores + 4)
    (https://github.com/Azure/azure-functions-python-worker/blob/dev/azure_functions_worker/dispatcher.py,
    _get_sync_tp_max_workers; https://docs.python.org/3.11/library/concurrent.futures.html#threadpoolexecutor).
    """
    raw = environ.get(THREAD_COUNT_SETTING, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value >= 1:
            return value
        log.warning("devhost: %s=%r must be an integer of at least 1; using the default", THREAD_COUNT_SETTING, raw)
    return min(32, (os.cpu_count() or 1) + 4)


def disabled_functions(environ: Mapping[str, str]) -> set[str]:
    """Functions whose trigger the host ignores: app setting `AzureWebJobs.<name>.Disabled` = true
    (https://learn.microsoft.com/azure/azure-functions/disable-function). The master key still runs them
    through `POST /admin/functions/<name>`, as in Azure."""
    prefix, suffix = "AzureWebJobs.", ".Disabled"
    return {key[len(prefix):-len(suffix)] for key, value in environ.items()
            if key.startswith(prefix) and key.endswith(suffix) and value.strip().lower() in ("true", "1")}


def design_thread_count() -> int:
    """PYTHON_THREADPOOL_THREAD_COUNT as the app is deployed with it (local.settings.example.json)."""
    values = json.loads(DESIGN_SETTINGS.read_text())["Values"]
    return int(values[THREAD_COUNT_SETTING])


HTTP_GROUP = "http"
TIMERS = "timers"
ALL = "all"


def scale_group(name: str, trigger_type: str) -> str:
    """The Flex Consumption scale group a function belongs to: HTTP triggers scale together as `http`,
    every other function on its own instances as `function:<name>`
    (https://learn.microsoft.com/azure/azure-functions/flex-consumption-plan#per-function-scaling)."""
    return HTTP_GROUP if trigger_type == "httpTrigger" else f"function:{name}"


def select_functions(functions: Mapping[str, str], selectors: Collection[str]) -> set[str]:
    """The names of the functions an instance serves, from `{name: trigger type}` and selectors: `all`,
    `http` (the HTTP group), `timers` (every timer function: in Azure a timer fires on one instance only,
    so locally one instance runs them all) or a function's name. An unknown selector is a ValueError
    naming it and what would have been valid."""
    chosen: set[str] = set()
    for raw in selectors:
        selector = raw.strip()
        if selector == ALL:
            chosen.update(functions)
        elif selector == HTTP_GROUP:
            chosen.update(n for n, t in functions.items() if t == "httpTrigger")
        elif selector == TIMERS:
            chosen.update(n for n, t in functions.items() if t == "timerTrigger")
        elif selector in functions:
            chosen.add(selector)
        else:
            valid = ", ".join([ALL, HTTP_GROUP, TIMERS, *sorted(functions)])
            raise ValueError(f"--functions: no function or group {selector!r} (valid: {valid})")
    return chosen


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
    handler: Callable[..., Any]


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
    schedule: Schedule | None = None  # timers only
    run_on_startup: bool = False


def _route_regex(template: str) -> re.Pattern[str]:
    parts = []
    for segment in template.strip("/").split("/"):
        m = re.fullmatch(r"\{(\w+)(?::\w+)?(\?)?\}", segment)
        if m:
            parts.append(f"(?P<{m.group(1)}>[^/]+)" + ("?" if m.group(2) else ""))
        else:
            parts.append(re.escape(segment))
    return re.compile("^" + "/".join(parts) + "/?$", re.IGNORECASE)


def _unescape_path(path: str) -> str:
    """The request path as the host's ASP.NET Core server hands it to routing: every escape decoded except
    %2F, which would change where the segments split (https://github.com/dotnet/aspnetcore/issues/30655)."""
    return unquote(re.sub(r"%(2[fF])", r"%25\1", path))


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
        elif spec["type"] == "timerTrigger":
            try:
                schedule = Schedule.parse(spec["schedule"])
            except ScheduleError as exc:
                raise RuntimeError(f"function {name}: {exc}") from None
            others.append(OtherFunction(name, spec["type"], trigger.name, handler, schedule,
                                        bool(spec.get("runOnStartup"))))
        else:
            others.append(OtherFunction(name, spec["type"], trigger.name, handler))
    return routes, queues, others


class LanguageWorker:
    """Where function code runs, as in Microsoft's Python worker: synchronous functions of every trigger
    share one thread pool, `async def` functions run on one event loop and take no pool thread
    (https://learn.microsoft.com/azure/azure-functions/python-scale-performance-reference#async).
    The host side (HTTP server, queue pollers, timers) only waits here for the result."""

    def __init__(self, thread_count: int, *, event_loop: bool) -> None:
        self.thread_count = thread_count
        self._pool = ThreadPoolExecutor(max_workers=thread_count, thread_name_prefix="worker")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        if event_loop:
            self._loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(target=self._loop.run_forever, name="worker-loop", daemon=True)
            self._loop_thread.start()

    def invoke(self, handler: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        """Run one invocation and return its result (or raise its exception) once it has run."""
        if inspect.iscoroutinefunction(handler):
            if self._loop is None:
                raise RuntimeError(f"{handler.__name__} is async but the worker has no event loop")
            return asyncio.run_coroutine_threadsafe(handler(**kwargs), self._loop).result()
        return self._pool.submit(handler, **kwargs).result()

    def stop(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._loop is not None and self._loop_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(10)
            self._loop.close()


class QueuePump:
    """Runs one queue-triggered function the way the host's QueueProcessor does."""

    def __init__(self, fn: QueueFunction, connection_string: str, options: QueueOptions, lease_seconds: int,
                 worker: LanguageWorker):
        self.fn, self.options, self.lease, self.worker = fn, options, lease_seconds, worker
        self.queue = QueueClient.from_connection_string(connection_string, fn.queue_name)
        self.poison = QueueClient.from_connection_string(connection_string, fn.queue_name + "-poison")
        for q in (self.queue, self.poison):
            ensure_queue(q)
        self._stop = threading.Event()
        self._in_flight = 0
        self._lock = threading.Lock()
        # The host's side of each fetched message (lease renewal, settling); the function itself runs on
        # the worker's shared pool, so a fetched message may wait there for a thread, as in Azure.
        self._slots = ThreadPoolExecutor(
            max_workers=options.batch_size + options.new_batch_threshold, thread_name_prefix=f"q-{fn.name}"
        )
        self._thread = threading.Thread(target=self._poll, name=f"poll-{fn.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def in_flight(self) -> int:
        """Messages fetched and not yet settled (running, or waiting for a worker thread)."""
        with self._lock:
            return self._in_flight

    def stop(self, wait: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(wait)
        self._slots.shutdown(wait=True, cancel_futures=True)

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
                self._slots.submit(self._run, message)

    def _run(self, message: Any) -> None:
        timer = Timer()
        try:
            try:
                body = self._decode(message.content)
            except ValueError as exc:
                self._poison(message, message.pop_receipt, exc, timer)
                return
            lease = _LeaseKeeper(self.queue, message, self.lease)
            try:
                self.worker.invoke(self.fn.handler, {
                    self.fn.arg_name: QueueMessage(
                        id=message.id,
                        body=body,
                        dequeue_count=message.dequeue_count,
                        expiration_time=message.expires_on,
                        insertion_time=message.inserted_on,
                        time_next_visible=message.next_visible_on,
                        pop_receipt=message.pop_receipt,
                    )
                })
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
        if message.dequeue_count >= self.options.max_dequeue_count:
            self._poison(message, receipt, exc, timer)
        else:
            self._settle(lambda: self.queue.update_message(
                message.id, receipt, visibility_timeout=int(self.options.visibility_timeout)))
            outcome(log, "queue", "failed", level=logging.WARNING, function=self.fn.name,
                    message_id=message.id, dequeue_count=message.dequeue_count,
                    error=f"{type(exc).__name__}: {exc}", ms=timer.ms)

    def _poison(self, message: Any, receipt: str, exc: Exception, timer: Timer) -> None:
        """Copy the message as it is on the wire to `<queue>-poison` and delete it. A message that does not
        decode goes here at once, without an invocation: the Storage Queues extension moves it from the
        queue client's MessageDecodingFailed handler (https://github.com/Azure/azure-sdk-for-net/blob/main/
        sdk/storage/Microsoft.Azure.WebJobs.Extensions.Storage.Queues/src/QueueServiceClientProvider.cs)."""
        self.poison.send_message(message.content)
        self._settle(lambda: self.queue.delete_message(message.id, receipt))
        outcome(log, "queue", "poisoned", level=logging.ERROR, function=self.fn.name, message_id=message.id,
                dequeue_count=message.dequeue_count, error=f"{type(exc).__name__}: {exc}", ms=timer.ms)

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


NEVER = datetime(1, 1, 1, tzinfo=UTC).isoformat()  # ScheduleStatus.Last before a timer's first run


class TimerRunner:
    """Fires one timer function on its NCRONTAB schedule, like the timer extension's TimerListener
    (https://github.com/Azure/azure-webjobs-sdk-extensions/blob/dev/src/WebJobs.Extensions/Extensions/Timers/
    Listener/TimerListener.cs): one invocation at a time; the function gets ScheduleStatus with Last (the
    previous run), Next (the occurrence now firing) and LastUpdated; the next occurrence is counted from the
    start of this one, so a run longer than the period is followed at once by one catch-up run, not several.
    Not modelled: the status blob that reports an occurrence missed while the host was down (IsPastDue)
    and the blob lease that lets one instance of many fire."""

    def __init__(self, fn: OtherFunction, worker: LanguageWorker,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        assert fn.schedule is not None
        self.fn, self.schedule, self.worker, self.clock = fn, fn.schedule, worker, clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"timer-{fn.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        last = NEVER
        due = self.schedule.next_after(self.clock())
        if self.fn.run_on_startup:
            self._fire(last, due, due)
        while not self._stop.is_set():
            wait = (due - self.clock()).total_seconds()
            if wait > 0:
                self._stop.wait(min(wait, 60.0))  # re-read the clock at least once a minute
                continue
            started = max(self.clock(), due)
            self._fire(last, due, started)
            last = started.isoformat()
            due = self.schedule.next_after(started)

    def _fire(self, last: str, due: datetime, started: datetime) -> None:
        status = {"Last": last, "Next": due.isoformat(), "LastUpdated": last}
        request = TimerRequest(past_due=False, schedule_status=status,
                               schedule={"AdjustForDST": True})
        timer = Timer()
        try:
            self.worker.invoke(self.fn.handler, {self.fn.arg_name: request})
        except Exception as exc:  # a failed run never stops the schedule
            outcome(log, "timer", "failed", level=logging.ERROR, function=self.fn.name, scheduled=due.isoformat(),
                    error=f"{type(exc).__name__}: {exc}", ms=timer.ms)
            return
        outcome(log, "timer", "completed", function=self.fn.name, scheduled=due.isoformat(),
                started=started.isoformat(), ms=timer.ms)


class DevHost(Served):
    """Serves one FunctionApp: HTTP on a local port, queue triggers from Azurite, timers on schedule."""

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
        thread_count: int | None = None,
        functions: Collection[str] = (ALL,),
    ) -> None:
        self.routes, self.queue_functions, self.other_functions = discover(app)
        self.triggers: dict[str, str] = {
            **{r.name: "httpTrigger" for r in self.routes},
            **{q.name: "queueTrigger" for q in self.queue_functions},
            **{o.name: o.trigger_type for o in self.other_functions},
        }
        # What this instance serves; the rest of the app is loaded (as on every instance in Azure) but its
        # triggers are left to other instances.
        self.serving = select_functions(self.triggers, functions)
        self.options = QueueOptions.from_host_json(
            host_json if host_json is not None else json.loads((ROOT / "host.json").read_text())
        )
        self.function_key, self.master_key = function_key, master_key
        handlers = [f.handler for f in (*self.routes, *self.queue_functions, *self.other_functions)]
        self.worker = LanguageWorker(
            thread_count if thread_count is not None else worker_thread_count(os.environ),
            event_loop=any(inspect.iscoroutinefunction(h) for h in handlers),
        )
        off = disabled_functions(os.environ)
        self.pumps = [
            QueuePump(fn, connection_strings[fn.connection], self.options, lease_seconds, self.worker)
            for fn in self.queue_functions if fn.name in self.serving and fn.name not in off
        ]
        self.timers = [TimerRunner(fn, self.worker) for fn in self.other_functions
                       if fn.schedule is not None and fn.name in self.serving and fn.name not in off]
        self._started = time.monotonic()
        self._listen(self.dispatch, "127.0.0.1", port, "devhost-http")

    def start(self) -> Self:
        super().start()
        for pump in self.pumps:
            pump.start()
        for runner in self.timers:
            runner.start()
        return self

    def stop(self) -> None:
        for runner in self.timers:
            runner.stop()
        for pump in self.pumps:
            pump.stop()
        super().stop()
        self.worker.stop()

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
        # The host leaves out query parameters without a value (`?a=&b=1` reaches the function as {"b": "1"}).
        query = dict(parse_qsl(parts.query))
        path = _unescape_path(parts.path)
        if path.startswith("/admin/functions/") and method == "POST":
            return self._admin_invoke(path.removeprefix("/admin/functions/"), headers, query, body)
        if path.rstrip("/") == "/admin/host/status" and method == "GET":
            return self._host_status(headers, query)
        if not path.startswith("/api/"):
            return 404, {}, b""
        sub = path.removeprefix("/api/")
        # An instance outside the HTTP group has no routes: in Azure no request is sent to it.
        for route in (r for r in self.routes if r.name in self.serving):
            m = route.pattern.match(sub)
            # A known route with a method it does not take is a 404, not a 405, in the real host
            # (https://github.com/Azure/azure-functions-host/issues/10098).
            if not m or (route.methods is not None and method not in route.methods):
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
                response = self.worker.invoke(route.handler, {route.arg_name: request})
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
        return 404, {}, b""

    def _host_status(self, headers: dict[str, str], query: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        """`GET /admin/host/status` (master key), as the real host answers it (state, processUptime in ms:
        https://github.com/Azure/azure-functions-host/blob/dev/src/WebJobs.Script.WebHost/Controllers/
        HostController.cs), plus what only a local run needs: every function's scale group and the ones this
        instance serves, so devstack/stack.py can start one set of instances per group, and the messages each
        queue function has in flight here, so a test can kill the instance that is running a given piece of work."""
        if not self._key_ok("ADMIN", headers, query):
            return 401, {}, b""
        body = {
            "state": "Running",
            "processUptime": int((time.monotonic() - self._started) * 1000),
            "functions": {name: {"trigger": trigger, "group": scale_group(name, trigger)}
                          for name, trigger in sorted(self.triggers.items())},
            "serving": sorted(self.serving),
            "inFlight": {pump.fn.name: pump.in_flight for pump in self.pumps},
        }
        return 200, {"Content-Type": "application/json; charset=utf-8"}, json.dumps(body).encode()

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
            self.worker.invoke(fn.handler, {fn.arg_name: arg})
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
    parser.add_argument("--functions", default=ALL, metavar="SELECTORS",
                        help="what this instance serves, comma-separated: all (default), http (the HTTP group), "
                             "timers, or a function's name (e.g. contact_worker)")
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

    try:
        host = DevHost(
            app,
            connection_strings={"AzureWebJobsStorage": os.environ["AzureWebJobsStorage"]},
            function_key=os.environ.get("DEVHOST_FUNCTION_KEY", "dev-function-key"),
            master_key=os.environ.get("DEVHOST_MASTER_KEY", "dev-master-key"),
            port=args.port,
            lease_seconds=args.lease_seconds,
            functions=args.functions.split(","),
        ).start()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("devhost: listening on %s (%d HTTP routes, %d queue triggers, %d other functions; serving %s; "
             "%d worker threads for sync functions)", host.url, len(host.routes), len(host.queue_functions),
             len(host.other_functions), ", ".join(sorted(host.serving)) or "nothing", host.worker.thread_count)
    return serve_until_terminated(host, lambda url: None)


if __name__ == "__main__":
    sys.exit(main())
