"""The Wave simulator behaves like the documented contacts API (README "Sync: webhooks, contact worker,
backfill") and signs webhooks as README's webhook contract says."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from devstack.wave_sim import WaveSimulator
from sync.signature import HEADER, verify

TOKEN = "sim-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def sim():
    with WaveSimulator(token=TOKEN, secrets=["s_new", "s_old"]) as s:
        yield s


def _list(sim, account, **params):
    return requests.get(f"{sim.url}/v1/accounts/{account}/contacts", params=params, headers=AUTH, timeout=10)


def test_pages_cover_every_contact_once_with_an_opaque_cursor(sim):
    ids = sim.seed("acct_1", 25)
    seen, cursor = [], None
    while True:
        res = _list(sim, "acct_1", limit=10, **({"cursor": cursor} if cursor else {}))
        assert res.status_code == 200
        body = res.json()
        assert len(body["data"]) <= 10
        seen += [c["id"] for c in body["data"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert "c_" not in cursor  # opaque, not a readable id
    assert sorted(seen) == sorted(ids) and len(seen) == 25
    assert all(c["version"] == 1 for c in sim.contacts("acct_1"))
    assert _list(sim, "acct_other").json() == {"data": [], "next_cursor": None}


@pytest.mark.parametrize("params,status", [({"limit": 0}, 400), ({"limit": 501}, 400), ({"limit": "x"}, 400),
                                           ({"cursor": "!!not-a-cursor"}, 400), ({"limit": 500}, 200)])
def test_limits_and_cursors_are_validated(sim, params, status):
    assert _list(sim, "acct_1", **params).status_code == status


def test_bearer_token_is_required(sim):
    url = f"{sim.url}/v1/accounts/acct_1/contacts"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401


def test_429_and_5xx_on_demand_then_recovery(sim):
    requests.post(f"{sim.url}/_control/faults", json={"throttle": 2, "retry_after": 3, "errors": 1,
                                                      "status": 502}, timeout=10)
    first = _list(sim, "acct_1")
    assert first.status_code == 429 and first.headers["Retry-After"] == "3"
    assert _list(sim, "acct_1").status_code == 429
    assert _list(sim, "acct_1").status_code == 502
    assert _list(sim, "acct_1").status_code == 200
    assert [r["status"] for r in sim.api_requests("acct_1")] == [429, 429, 502, 200]


def test_versions_increase_and_a_delete_has_its_own_version(sim):
    created = sim.create_contact("acct_1", first_name="Ada", team_member={"id": "tm_1", "email": "o@x.com"})
    cid = created["data"]["contact"]["id"]
    updated = sim.update_contact("acct_1", cid, last_name="Lovelace")
    deleted = sim.delete_contact("acct_1", cid)
    assert [e["type"] for e in (created, updated, deleted)] == ["contact.created", "contact.updated",
                                                                 "contact.deleted"]
    assert [e["data"]["contact"]["version"] for e in (created, updated, deleted)] == [1, 2, 3]
    assert updated["data"]["contact"]["first_name"] == "Ada"  # full snapshot, not a patch
    assert deleted["data"]["contact"] == {"id": cid, "version": 3}
    assert sim.contact("acct_1", cid) is None
    again = sim.create_contact("acct_1", id=cid, first_name="Ada")
    assert again["data"]["contact"]["version"] == 4


class _Recorder:
    def __init__(self, protocol: str = "HTTP/1.0"):
        self.received: list[tuple[bytes, str]] = []
        self.connections: set[int] = set()  # the client ports requests came from
        rec = self

        class H(BaseHTTPRequestHandler):
            protocol_version = protocol

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                rec.received.append((body, self.headers[HEADER]))
                rec.connections.add(self.client_address[1])
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"


def test_webhooks_are_signed_duplicated_reordered_and_delayed(sim):
    rec = _Recorder()
    sim.webhook_url = rec.url
    events = [sim.create_contact("acct_1", first_name=f"N{i}") for i in range(3)]
    assert sim.send(events, duplicates=2, order="reverse") == [202] * 6
    ids = [json.loads(body)["id"] for body, _ in rec.received]
    assert ids == [e["id"] for e in reversed(events) for _ in range(2)]
    for body, header in rec.received:
        assert verify(header, body, ("s_old",), time.time()) and verify(header, body, ("s_new",), time.time())
    rec.received.clear()
    thread = sim.send(events[:1], delay=0.2)
    assert rec.received == []  # not yet: it is delayed
    thread.join(10)
    assert len(rec.received) == 1
    rec.server.shutdown()


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/1.0"])
def test_a_burst_poster_posts_signed_events_on_a_kept_connection(sim, protocol):
    """WebhookSender.post (the burst benchmark's poster): the same signed bodies as deliver(), on one kept
    connection per thread while the server keeps it open, and a new one when the server closes it."""
    rec = _Recorder(protocol)
    sim.webhook_url = rec.url
    events = [sim.create_contact("acct_1", first_name=f"N{i}") for i in range(4)]
    assert [sim.sender.post(e) for e in events] == [202] * 4
    assert [json.loads(body)["id"] for body, _ in rec.received] == [e["id"] for e in events]
    assert all(verify(header, body, ("s_old",), time.time()) for body, header in rec.received)
    assert len(rec.connections) == (1 if protocol == "HTTP/1.1" else 4)
    rec.server.shutdown()


def test_control_api_drives_the_simulator_over_http(sim):
    base = f"{sim.url}/_control/accounts/acct_2"
    made = requests.post(f"{base}/contacts", json={"first_name": "Grace"}, timeout=10).json()["event"]
    cid = made["data"]["contact"]["id"]
    changed = requests.post(f"{base}/contacts", json={"id": cid, "last_name": "Hopper"}, timeout=10).json()
    assert changed["event"]["data"]["contact"]["version"] == 2
    assert requests.delete(f"{base}/contacts/{cid}", timeout=10).json()["event"]["type"] == "contact.deleted"
    assert requests.post(f"{base}/seed", json={"count": 3}, timeout=10).status_code == 200
    listed = requests.get(f"{base}/contacts", timeout=10).json()
    assert len(listed["contacts"]) == 3 and listed["deleted"] == [{"id": cid, "version": 3, "deleted": True}]
    sim.mount(lambda method, path, headers, body: (200, {}, b"mounted") if path == "/extra" else None)
    assert requests.get(f"{sim.url}/extra", timeout=10).text == "mounted"
    assert requests.get(f"{sim.url}/nothing", timeout=10).status_code == 404
