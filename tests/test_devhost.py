"""The dev host behaves like the Functions host, against real Azurite."""

from __future__ import annotations

import base64
import time

import pytest
import requests
from azure.storage.queue import QueueClient

from core.storage import QueueSender
from devstack.devhost import DevHost
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


@pytest.fixture
def host(azurite):
    raw = QueueClient.from_connection_string(azurite.connection_string, PROBE_QUEUE)
    poison = QueueClient.from_connection_string(azurite.connection_string, PROBE_QUEUE + "-poison")
    h = DevHost(
        hostprobe.app,
        connection_strings={"AzureWebJobsStorage": azurite.connection_string},
        function_key="fkey",
        master_key="mkey",
        host_json=HOST_JSON,
        lease_seconds=10,
    )
    for q in (raw, poison):
        q.clear_messages()
    probe.calls.clear()
    probe.failures_left.clear()
    probe.max_running = 0
    probe.gate.clear()
    h.start()
    try:
        yield h, raw, poison
    finally:
        probe.gate.set()
        h.stop()


def _send_b64(raw: QueueClient, body: bytes) -> None:
    raw.send_message(base64.b64encode(body).decode())


def _calls_for(body: bytes) -> list[tuple[str, int, bytes]]:
    return [c for c in probe.calls if c[2] == body]


def test_base64_message_is_decoded_before_the_function_sees_it(host, azurite):
    _, _, _ = host
    QueueSender(_storage(azurite)).send(PROBE_QUEUE, {"contact": "c_1"})
    assert probe.wait_for(lambda p: _calls_for(b'{"contact":"c_1"}'))
    assert _calls_for(b'{"contact":"c_1"}')[0][1] == 1


def test_plain_text_message_is_not_base64_and_ends_in_poison(host):
    _, raw, poison = host
    raw.send_message("not base64 at all!")  # what a producer without an encode policy writes
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not list(poison.peek_messages()):
        time.sleep(0.1)
    assert [m.content for m in poison.peek_messages()] == ["not base64 at all!"]
    assert not _calls_for(b"not base64 at all!"), "the function must never see an undecodable message"


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
    assert ok.status_code == 200 and ok.json() == {"item_id": "42", "q": "x"}
    assert requests.get(url, params={"code": "fkey"}, timeout=5).status_code == 200
    assert requests.get(url, params={"code": "mkey"}, timeout=5).status_code == 200  # master key opens all


def test_anonymous_routes_unknown_routes_and_methods(host):
    h, _, _ = host
    assert requests.post(f"{h.url}/api/open", data=b"hi", timeout=5).content == b"hi"
    assert requests.get(f"{h.url}/api/nowhere", timeout=5).status_code == 404
    assert requests.get(f"{h.url}/open", timeout=5).status_code == 404  # routes live under /api/
    assert requests.delete(f"{h.url}/api/open", timeout=5).status_code == 405


def test_timer_runs_through_the_admin_api_with_the_master_key_only(host):
    h, _, _ = host
    before = probe.timer_runs
    url = f"{h.url}/admin/functions/nightly"
    assert requests.post(url, json={}, headers={"x-functions-key": "fkey"}, timeout=5).status_code == 401
    assert requests.post(url, json={}, headers={"x-functions-key": "mkey"}, timeout=5).status_code == 202
    assert probe.timer_runs == before + 1


def test_the_real_app_is_discovered_from_function_app(devhost):
    response = requests.get(f"{devhost.url}/api/health", timeout=5)
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert {"health"} <= {r.name for r in devhost.routes}


def _storage(azurite):
    from core.settings import StorageSettings

    return StorageSettings(connection_string=azurite.connection_string)
