"""The Wave contacts API client against small local stand-ins: the bearer token reaches
WAVE_API_BASE_URL and nothing else (no redirect followed, no proxy from the environment)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from devstack.http_server import make_server
from sync.wave_api import WaveClient, WaveError

TOKEN = "wave-token-for-the-client-test"


@dataclass
class StandIn:
    """Answers every request with one fixed response and remembers what it was asked."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    url: str = ""

    def dispatch(self, method: str, path: str, headers: dict[str, str], body: bytes
                 ) -> tuple[int, dict[str, str], bytes]:
        self.seen.append((path, headers))
        return self.status, {"Content-Type": "application/json", **self.headers}, self.body


@pytest.fixture
def serve() -> Iterator:
    servers = []

    def start(stand_in: StandIn) -> StandIn:
        server = make_server(stand_in.dispatch, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        stand_in.url = f"http://127.0.0.1:{server.server_address[1]}"
        return stand_in

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


PAGE = json.dumps({"data": [{"id": "c_1", "version": 1}], "next_cursor": None}).encode()


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_an_error_naming_it_and_is_not_followed(serve, status):
    elsewhere = serve(StandIn(body=PAGE))
    wave = serve(StandIn(status=status, headers={"Location": f"{elsewhere.url}/v1/accounts/a/contacts?x=secret"}))
    with pytest.raises(WaveError) as err:
        WaveClient(wave.url, TOKEN).contacts_page("acct_1", None)
    message = str(err.value)
    assert f"answered {status}, a redirect to http://127.0.0.1" in message and "not followed" in message
    assert TOKEN not in message and "secret" not in message
    assert elsewhere.seen == []
    assert len(wave.seen) == 1


def test_proxy_variables_in_the_environment_are_ignored(serve, monkeypatch):
    proxy = serve(StandIn(body=json.dumps({"data": [], "next_cursor": None}).encode()))
    wave = serve(StandIn(body=PAGE))
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy.url)
    page = WaveClient(wave.url, TOKEN).contacts_page("acct_1", None)
    assert [c["id"] for c in page.contacts] == ["c_1"]
    assert proxy.seen == []
    assert wave.seen[0][1]["authorization"] == f"Bearer {TOKEN}"
