"""The dev host behaves like the Functions host, against real Azurite."""

from __future__ import annotations

import base64
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import azure.functions as func
import pytest
import requests
from azure.storage.queue import QueueClient

from core.storage import QueueSender
from devstack.devhost import THREAD_COUNT_SETTING, DevHost, disabled_functions, worker_thread_count
from devstack.ncrontab import Schedule, ScheduleError
from tests.apps import hostprobe
from tests.apps.hostprobe import PROBE_QUEUE, probe

HOST_JSON = {
    "extensions": {
        "queues": {
            "maxPollingInterval": "00:00:00.200",
            "visibilityTimeout": "00:00:02",
            "batchSize": 3,
            "newBatchThreshold": 1,
            "maxDequeueCount": 3,
            "messageEncoding": "base64",
        }
    }
}


POOL = 5  # the probe host's worker threads: more than the queue may hold (batchSize 3 + newBatchThreshold 1)


@contextmanager
def _probe_host(azurite, host_json: dict):
    raw = QueueClient.from_connection_string(azurite.connection_string, PROBE_QUEUE)
    poison = QueueClient.from_connection_string(azurite.connection_string, PROBE_QUEUE + "-poison")
    h = DevHost(
        hostprobe.app,
        connection_strings={"AzureWebJobsStorage": azurite.connection_string},
        function_key="fkey",
        master_key="mkey",
        host_json=host_json,
        lease_seconds=10,
    )
    for q in (raw, poison):
        q.clear_messages()
    probe.calls.clear()
    probe.failures_left.clear()
    probe.ticks.clear()
    probe.max_running = 0
    probe.http_blocked = 0
    probe.gate.clear()
    h.start()
    try:
        yield h, raw, poison
    finally:
        probe.gate.set()
        h.stop()


@pytest.fixture
def host(azurite, monkeypatch):
    # The pool size comes from the setting, as the worker reads it.
    monkeypatch.setenv(THREAD_COUNT_SETTING, str(POOL))
    with _probe_host(azurite, HOST_JSON) as started:
        yield started


def _send_b64(raw: QueueClient, body: bytes) -> None:
    raw.send_message(base64.b64encode(body).decode())


def _calls_for(body: bytes) -> list[tuple[str, int, bytes]]:
    return [c for c in probe.calls if c[2] == body]


def test_base64_message_is_decoded_before_the_function_sees_it(host, azurite):
    _, _, _ = host
    QueueSender(_storage(azurite)).send(PROBE_QUEUE, {"contact": "c_1"})
    assert probe.wait_for(lambda p: _calls_for(b'{"contact":"c_1"}'))
    assert _calls_for(b'{"contact":"c_1"}')[0][1] == 1


def test_a_message_that_is_not_base64_goes_to_poison_at_once_without_an_invocation(azurite):
    # A retry would come back only after visibilityTimeout (a minute here), and maxDequeueCount 3 would
    # take three of them: the poison queue fills long before that only if the first receive poisons it.
    slow_retries = {"extensions": {"queues": {**HOST_JSON["extensions"]["queues"], "visibilityTimeout": "00:01:00"}}}
    with _probe_host(azurite, slow_retries) as (_, raw, poison):
        raw.send_message("not base64 at all!")  # what a producer without an encode policy writes
        _send_b64(raw, b"fine")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not list(poison.peek_messages()):
            time.sleep(0.1)
        assert [m.content for m in poison.peek_messages()] == ["not base64 at all!"]  # as it was on the wire
        assert not _calls_for(b"not base64 at all!"), "the function must never see an undecodable message"
        assert probe.wait_for(lambda p: _calls_for(b"fine")), "the next message is not held up"
        assert probe.wait_for(lambda p: not list(raw.peek_messages()), timeout=10)


def test_failed_message_comes_back_after_visibility_timeout_with_higher_dequeue_count(host):
    _, raw, _ = host
    probe.failures_left[b"flaky"] = 2
    _send_b64(raw, b"flaky")
    assert probe.wait_for(lambda p: len(_calls_for(b"flaky")) == 3, timeout=30)
    counts = [c[1] for c in _calls_for(b"flaky")]
    assert counts == [1, 2, 3]
    # Completed on the third attempt: the message is gone, not poisoned.
    assert probe.wait_for(lambda p: not list(raw.peek_messages()), timeout=5)


def test_retry_waits_at_least_the_visibility_timeout(host):
    _, raw, _ = host
    probe.failures_left[b"once"] = 1
    _send_b64(raw, b"once")
    assert probe.wait_for(lambda p: len(_calls_for(b"once")) >= 1)
    failed_at = time.monotonic()
    assert probe.wait_for(lambda p: len(_calls_for(b"once")) == 2, timeout=30)
    assert time.monotonic() - failed_at >= 1.5  # visibilityTimeout is 2 s (Azurite has 1 s resolution)


def test_message_moves_to_poison_after_max_dequeue_count(host):
    _, raw, poison = host
    _send_b64(raw, b"always-fail")
    assert probe.wait_for(lambda p: len(_calls_for(b"always-fail")) == 3, timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not list(poison.peek_messages()):
        time.sleep(0.1)
    poisoned = list(poison.peek_messages())
    assert [base64.b64decode(m.content) for m in poisoned] == [b"always-fail"]
    assert [c[1] for c in _calls_for(b"always-fail")] == [1, 2, 3]
    assert not list(raw.peek_messages())


def test_concurrency_is_bounded_by_batch_size_and_threshold(host):
    _, raw, _ = host
    for i in range(8):
        _send_b64(raw, f"block-{i}".encode())
    assert probe.wait_for(lambda p: p.running >= 3, timeout=20)
    time_limit = time.monotonic() + 1
    while time.monotonic() < time_limit:  # give the poller every chance to over-fetch
        assert probe.running <= 4  # batchSize 3 + newBatchThreshold 1
        time.sleep(0.05)
    probe.gate.set()
    assert probe.wait_for(lambda p: len([c for c in p.calls if c[2].startswith(b"block")]) == 8, timeout=20)
    assert 3 <= probe.max_running <= 4


def test_function_keys_guard_function_level_routes(host):
    h, _, _ = host
    url = f"{h.url}/api/items/42"
    assert requests.get(url, timeout=5).status_code == 401
    assert requests.get(url, headers={"x-functions-key": "wrong"}, timeout=5).status_code == 401
    ok = requests.get(url, headers={"x-functions-key": "fkey"}, params={"q": "x"}, timeout=5)
    assert ok.status_code == 200 and ok.json() == {"item_id": "42", "params": {"q": "x"}}
    assert requests.get(url, params={"code": "fkey"}, timeout=5).status_code == 200
    assert requests.get(url, params={"code": "mkey"}, timeout=5).status_code == 200  # master key opens all


def test_anonymous_routes_unknown_routes_and_methods(host):
    h, _, _ = host
    assert requests.post(f"{h.url}/api/open", data=b"hi", timeout=5).content == b"hi"
    assert requests.get(f"{h.url}/api/nowhere", timeout=5).status_code == 404
    assert requests.get(f"{h.url}/open", timeout=5).status_code == 404  # routes live under /api/


def test_a_known_route_with_a_method_it_does_not_take_is_404_as_in_the_real_host(host):
    h, _, _ = host
    assert requests.delete(f"{h.url}/api/open", timeout=5).status_code == 404
    keyed = requests.post(f"{h.url}/api/items/42", headers={"x-functions-key": "fkey"}, timeout=5)
    assert keyed.status_code == 404 and not keyed.content


def test_route_values_reach_the_function_url_decoded(host):
    h, _, _ = host

    def item(raw: str) -> str:
        res = requests.get(f"{h.url}/api/items/{raw}", headers={"x-functions-key": "fkey"}, timeout=5)
        assert res.status_code == 200, raw
        return res.json()["item_id"]

    assert item("caf%C3%A9%20au%20lait") == "café au lait"
    assert item("a+b") == "a+b"  # a plus in a path is a plus, not a space
    assert item("a%2Fb") == "a%2Fb"  # an escaped slash stays escaped: decoding it would move the segments


def test_query_parameters_without_a_value_are_left_out(host):
    h, _, _ = host
    res = requests.get(f"{h.url}/api/items/1?q=&r=1&s", headers={"x-functions-key": "fkey"}, timeout=5)
    assert res.status_code == 200 and res.json()["params"] == {"r": "1"}


def test_timer_runs_through_the_admin_api_with_the_master_key_only(host):
    h, _, _ = host
    before = probe.timer_runs
    url = f"{h.url}/admin/functions/nightly"
    assert requests.post(url, json={}, headers={"x-functions-key": "fkey"}, timeout=5).status_code == 401
    assert requests.post(url, json={}, headers={"x-functions-key": "mkey"}, timeout=5).status_code == 202
    assert probe.timer_runs == before + 1


# -- one worker pool for every synchronous function, async functions on an event loop -----------------


def test_http_queue_and_timer_functions_share_one_pool_sized_by_the_setting(host):
    h, raw, _ = host
    for i in range(3):  # one batch (batchSize 3) blocks, so the queue takes no more
        _send_b64(raw, f"block-{i}".encode())
    assert probe.wait_for(lambda p: p.running == 3, timeout=20)
    with ThreadPoolExecutor(4) as callers:
        held = [callers.submit(requests.get, f"{h.url}/api/block", timeout=30) for _ in range(2)]
        assert probe.wait_for(lambda p: p.running == POOL, timeout=10), "two HTTP calls take the last threads"
        timer_runs = probe.timer_runs
        waiting_http = callers.submit(requests.get, f"{h.url}/api/items/7", headers={"x-functions-key": "fkey"},
                                      timeout=30)
        waiting_timer = callers.submit(requests.post, f"{h.url}/admin/functions/nightly",
                                       headers={"x-functions-key": "mkey"}, timeout=30)
        # All POOL threads are taken: nothing else may start until one is free.
        assert not probe.wait_for(lambda p: p.running > POOL or p.timer_runs != timer_runs, timeout=1.5)
        assert not waiting_http.done() and not waiting_timer.done()
        probe.gate.set()
        assert waiting_http.result().status_code == 200
        assert waiting_timer.result().status_code == 202 and probe.timer_runs == timer_runs + 1
        assert [f.result().status_code for f in held] == [200, 200]
    assert probe.wait_for(lambda p: len([c for c in p.calls if c[2].startswith(b"block")]) == 3, timeout=20)
    assert probe.max_running == POOL


def test_async_functions_run_on_the_event_loop_while_the_pool_is_full(host):
    h, raw, _ = host
    for i in range(3):
        _send_b64(raw, f"block-{i}".encode())
    assert probe.wait_for(lambda p: p.running == 3, timeout=20)
    with ThreadPoolExecutor(2) as callers:
        held = [callers.submit(requests.get, f"{h.url}/api/block", timeout=30) for _ in range(2)]
        assert probe.wait_for(lambda p: p.running == POOL, timeout=20)
        res = requests.get(f"{h.url}/api/async-ping", timeout=10)  # would wait for the gate if it needed a thread
        assert res.status_code == 200
        probe.gate.set()
        assert [f.result().status_code for f in held] == [200, 200]


def test_the_pool_size_follows_the_worker_rules():
    default = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's own default, which the worker keeps
    assert worker_thread_count({}) == default
    assert worker_thread_count({THREAD_COUNT_SETTING: "64"}) == 64
    assert worker_thread_count({THREAD_COUNT_SETTING: "1"}) == 1
    for ignored in ("0", "-3", "many", "", "2.5"):  # the worker warns and keeps its default
        assert worker_thread_count({THREAD_COUNT_SETTING: ignored}) == default, ignored


# -- timers on their NCRONTAB schedule ------------------------------------------------------------------


def test_a_timer_fires_on_its_schedule_with_its_schedule_status(host):
    assert probe.wait_for(lambda p: len(p.ticks) >= 2, timeout=15), "every_two_seconds did not fire twice"
    (first_at, first), (second_at, second) = probe.ticks[:2]
    due = [datetime.fromisoformat(t["Next"]) for t in (first, second)]
    for at, when in zip((first_at, second_at), due, strict=True):
        assert when.second % 2 == 0 and when.microsecond == 0, when  # "*/2 * * * * *": even seconds only
        assert at >= when, "a timer never fires before its occurrence"
    assert due[1] > due[0] and (due[1] - due[0]).total_seconds() % 2 == 0
    assert datetime.fromisoformat(first["Last"]).year == 1  # no run before the first
    assert datetime.fromisoformat(second["Last"]) >= due[0]


def test_a_disabled_timer_does_not_fire_but_the_master_key_still_runs_it(azurite, monkeypatch):
    monkeypatch.setenv("AzureWebJobs.every_two_seconds.Disabled", "true")
    h = DevHost(hostprobe.app, connection_strings={"AzureWebJobsStorage": azurite.connection_string},
                function_key="f", master_key="m", host_json=HOST_JSON)
    assert "every_two_seconds" not in {runner.fn.name for runner in h.timers}
    assert "nightly" in {runner.fn.name for runner in h.timers}
    assert disabled_functions({"AzureWebJobs.a.Disabled": "True", "AzureWebJobs.b.Disabled": "false",
                               "AzureWebJobs.c.Disabled": "1"}) == {"a", "c"}


def test_a_timer_with_a_schedule_the_host_would_refuse_stops_the_start(azurite):
    app = func.FunctionApp()

    @app.timer_trigger(arg_name="timer", schedule="0 */5 * * *")  # five fields: cron, not NCRONTAB
    def five_fields(timer: func.TimerRequest) -> None:
        pass

    with pytest.raises(RuntimeError, match=r"five_fields.*expected 6 fields"):
        DevHost(app, connection_strings={}, function_key="f", master_key="m", host_json=HOST_JSON)


AT = datetime(2026, 12, 1, 6, 30, 15, 250_000, tzinfo=UTC)  # a Tuesday


@pytest.mark.parametrize(("schedule", "after", "expected"), [
    ("0 17 3 * * *", AT, datetime(2026, 12, 2, 3, 17, tzinfo=UTC)),  # refresh_idle_tokens: tomorrow
    ("0 47 3 * * *", AT.replace(hour=3, minute=46, second=59), datetime(2026, 12, 1, 3, 47, tzinfo=UTC)),
    ("0 47 3 * * *", AT.replace(hour=3, minute=47, second=0, microsecond=0),  # strictly after
     datetime(2026, 12, 2, 3, 47, tzinfo=UTC)),
    ("*/15 * * * * *", AT, AT.replace(second=30, microsecond=0)),
    ("*/15 * * * * *", datetime(2026, 12, 31, 23, 59, 45, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
    ("5/20 * * * * *", AT, AT.replace(second=25, microsecond=0)),
    ("0 0,30 9-17/4 * * *", AT, datetime(2026, 12, 1, 9, 0, tzinfo=UTC)),
    ("0 30 9 * * Mon-Fri", AT.replace(hour=10), datetime(2026, 12, 2, 9, 30, tzinfo=UTC)),
    ("0 30 9 * * 6", AT, datetime(2026, 12, 5, 9, 30, tzinfo=UTC)),  # 0 is Sunday, 6 Saturday
    ("0 0 12 * Feb sunday", AT, datetime(2027, 2, 7, 12, 0, tzinfo=UTC)),
    ("0 0 0 31 * *", AT, datetime(2026, 12, 31, tzinfo=UTC)),
    ("0 0 0 31 * *", datetime(2026, 12, 31, 0, 0, 1, tzinfo=UTC), datetime(2027, 1, 31, tzinfo=UTC)),
    # Both day fields must match (NCrontab), not either one (Vixie cron): the 13th that is a Friday.
    ("0 0 0 13 * Fri", AT, datetime(2027, 8, 13, tzinfo=UTC)),
    ("0 0 0 29 Feb Mon", AT, datetime(2044, 2, 29, tzinfo=UTC)),
])
def test_ncrontab_next_occurrence(schedule, after, expected):
    assert Schedule.parse(schedule).next_after(after) == expected


def test_ncrontab_occurrences_follow_one_another():
    schedule = Schedule.parse("0 0 */6 * * *")
    moment, seen = AT, []
    for _ in range(5):
        moment = schedule.next_after(moment)
        seen.append(moment)
    assert [m - seen[0] for m in seen] == [timedelta(hours=6 * i) for i in range(5)]


@pytest.mark.parametrize(("schedule", "problem"), [
    ("0 */5 * * *", "expected 6 fields"),
    ("0 0 24 * * *", "hour field '24': 24 is outside 0-23"),
    ("60 * * * * *", "second field '60'"),
    ("0 0 0 0 * *", "day field '0': 0 is outside 1-31"),
    ("0 0 0 * 13 *", "month field '13'"),
    ("0 0 0 * * 7", "day-of-week field '7': 7 is outside 0-6"),
    ("*/0 * * * * *", "step '0'"),
    ("0 0 17-9 * * *", "runs backwards"),
    ("0 0 0 * * Funday", "'Funday' is not a number or a name"),
    ("0 0 0 * * *,", "'' is not a number"),
    ("0 0 0 31 Feb *", "never fires"),
])
def test_ncrontab_refuses_what_the_timer_trigger_refuses(schedule, problem):
    with pytest.raises(ScheduleError, match=problem.replace("*", r"\*")):
        Schedule.parse(schedule).next_after(AT)


def test_the_real_app_is_discovered_from_function_app(devhost):
    response = requests.get(f"{devhost.url}/api/health", timeout=5)
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert {"health"} <= {r.name for r in devhost.routes}


def _storage(azurite):
    from core.settings import StorageSettings

    return StorageSettings(connection_string=azurite.connection_string)
