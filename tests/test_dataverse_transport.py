"""dataverse/transport.py without the simulator or sockets: a fake session answers, a fake clock sleeps.

The request loop's rules (401 refresh, 429 Retry-After penalties, 5xx and network retries, the DOP hint)
checked call by call: what was sent, how long the transport slept, what it raised."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import requests
from requests.structures import CaseInsensitiveDict

from core.retry_after import DEFAULT_RETRY_AFTER, retry_after_seconds
from dataverse.client import DataverseClient
from dataverse.errors import AuthExpired, DataverseError, Throttled, Transient, ValidationFailed
from dataverse.transport import Transport
from tests.fixtures.fake_time import FakeTime

URL = "https://org.crm.dynamics.com"


def response(status: int, body: object = None, headers: Mapping[str, str] | None = None) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp.headers = CaseInsensitiveDict(headers or {})
    resp._content = b"" if body is None else json.dumps(body).encode()
    return resp


@dataclass
class Sent:
    method: str
    url: str
    authorization: str


@dataclass
class FakeSession:
    """Answers from a script, in order; an exception in the script is raised instead of answering."""

    script: list[requests.Response | Exception]
    sent: list[Sent] = field(default_factory=list)

    def request(self, method: str, url: str, *, data: bytes | None, headers: Mapping[str, str],
                timeout: tuple[float, float], verify: str | bool, allow_redirects: bool) -> requests.Response:
        assert allow_redirects is False  # the token must never follow a redirect
        self.sent.append(Sent(method, url, headers["Authorization"]))
        answer = self.script.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self) -> None:
        pass



class Tokens:
    def __init__(self) -> None:
        self.calls: list[bool] = []

    def __call__(self, force_refresh: bool = False) -> str:
        self.calls.append(force_refresh)
        return f"token-{len(self.calls)}"


def transport(script: list[requests.Response | Exception], **kwargs: object) -> tuple[Transport, FakeSession,
                                                                                     FakeTime, Tokens]:
    session, time, tokens = FakeSession(script), FakeTime(1000.0), Tokens()
    t = Transport(URL, tokens, session=session, sleep=time.sleep, clock=time.clock, **kwargs)  # type: ignore[arg-type]
    return t, session, time, tokens


def test_a_401_forces_one_token_refresh_and_one_retry() -> None:
    t, session, _, tokens = transport([response(401), response(200, {"UserId": "u"})])
    assert t.request("GET", "WhoAmI").json() == {"UserId": "u"}
    assert tokens.calls == [False, True]
    assert [s.authorization for s in session.sent] == ["Bearer token-1", "Bearer token-2"]


def test_a_second_401_after_the_refresh_is_auth_expired() -> None:
    t, session, _, tokens = transport([response(401), response(401, {"error": {"code": "0x80090", "message": "no"}})])
    with pytest.raises(AuthExpired):
        t.request("GET", "WhoAmI")
    assert tokens.calls == [False, True] and len(session.sent) == 2


def test_a_short_429_is_waited_out_inline_then_the_call_repeated() -> None:
    t, session, time, _ = transport([response(429, headers={"Retry-After": "1.5"}), response(204)],
                                    max_inline_wait=2.0)
    assert t.request("DELETE", "contacts(1)").status_code == 204
    assert time.slept == [1.5] and len(session.sent) == 2


def test_a_long_429_raises_throttled_and_nothing_is_sent_until_the_penalty_ends() -> None:
    t, session, time, _ = transport([response(429, headers={"Retry-After": "30"}), response(200, {})],
                                    max_inline_wait=2.0)
    with pytest.raises(Throttled) as err:
        t.request("GET", "contacts")
    assert err.value.retry_after == 30 and time.slept == []
    time.now += 10
    with pytest.raises(Throttled) as again:  # another call during the penalty: held back, not sent
        t.request("GET", "contacts")
    assert again.value.retry_after == pytest.approx(20) and len(session.sent) == 1
    time.now += 20
    assert t.request("GET", "contacts").status_code == 200 and len(session.sent) == 2


def test_repeated_short_429s_give_up_after_the_throttle_retries() -> None:
    script: list[requests.Response | Exception] = [response(429, headers={"Retry-After": "1"}) for _ in range(5)]
    t, session, time, _ = transport(script, max_inline_wait=2.0, max_throttle_retries=2)
    with pytest.raises(Throttled):
        t.request("GET", "contacts")
    assert time.slept == [1.0, 1.0] and len(session.sent) == 3


def test_an_http_date_retry_after_and_a_missing_one() -> None:
    now = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=7), usegmt=True), now=now) == 7
    assert retry_after_seconds(format_datetime(now - timedelta(seconds=7), usegmt=True), now=now) == 0
    assert retry_after_seconds(None) == retry_after_seconds("soon") == DEFAULT_RETRY_AFTER


def test_a_5xx_is_retried_then_raised_as_transient() -> None:
    t, session, time, _ = transport([response(503), response(502)], transient_retries=1)
    with pytest.raises(Transient):
        t.request("GET", "contacts")
    assert len(session.sent) == 2 and time.slept == [0.2]


def test_a_5xx_then_success_returns_the_success() -> None:
    t, session, _, _ = transport([response(500), response(200, {"value": []})], transient_retries=1)
    assert t.request("GET", "contacts").json() == {"value": []} and len(session.sent) == 2


def test_a_dropped_connection_is_retried_then_transient() -> None:
    t, session, _, _ = transport([requests.ConnectionError("reset"), requests.Timeout("slow")],
                                 transient_retries=1)
    with pytest.raises(Transient) as err:
        t.request("GET", "contacts")
    assert "Timeout" in str(err.value) and len(session.sent) == 2


def test_an_untrusted_certificate_is_not_retried() -> None:
    t, session, _, _ = transport([requests.exceptions.SSLError("self-signed")], transient_retries=3)
    with pytest.raises(DataverseError) as err:
        t.request("GET", "WhoAmI")
    assert not isinstance(err.value, Transient) and len(session.sent) == 1


def test_a_400_is_raised_at_once_naming_the_field() -> None:
    body = {"error": {"code": "0x80044331", "message": "The length of the 'firstname' attribute is too big"}}
    t, session, _, _ = transport([response(400, body)])
    with pytest.raises(ValidationFailed) as err:
        t.request("PATCH", "contacts(1)", body={"firstname": "x" * 60})
    assert err.value.field == "firstname" and len(session.sent) == 1


def test_the_dop_hint_is_kept() -> None:
    t, _, _, _ = transport([response(200, {}, {"x-ms-dop-hint": "7"}), response(200, {}, {"x-ms-dop-hint": "n/a"})])
    assert t.dop_hint is None
    t.request("GET", "WhoAmI")
    assert t.dop_hint == 7
    t.request("GET", "WhoAmI")
    assert t.dop_hint == 7  # an unreadable hint leaves the last one


def test_a_link_outside_the_instance_is_refused_without_sending_the_token() -> None:
    t, session, _, tokens = transport([])
    with pytest.raises(DataverseError):
        t.request("GET", "https://evil.example/api/data/v9.2/contacts")
    assert session.sent == [] and tokens.calls == []


def test_requests_are_counted_per_thread_and_the_client_uses_the_session_handed_in() -> None:
    privileges = {"RolePrivileges": [{"PrivilegeName": "prvReadContact"}]}
    session, time, tokens = FakeSession([response(200, privileges)]), FakeTime(1000.0), Tokens()
    client = DataverseClient(URL, tokens, session=session, sleep=time.sleep, clock=time.clock)
    assert client.retrieve_user_privileges("u1") == {"prvReadContact"}
    assert client.requests_made == 1
    assert session.sent[0].url.startswith(f"{URL}/api/data/v9.2/systemusers(u1)/")
