"""devstack/stack.py and the Wave admin page's backend, through their HTTP surfaces.

The stack is separate processes on free ports; the dev host survives a SIGKILL by being restarted on the
same port; the admin page's backend forwards to the connections API with the function key, which never
reaches the browser, and only for a signed-in Wave user who administers the account, from Wave's own origin.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest
import requests

from devstack.stack import Stack, StackOptions

ACCOUNT = "acct_stack_test"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack(StackOptions(name="test-stack")) as s:
        yield s


def test_every_process_runs_and_the_host_comes_back_after_sigkill(stack: Stack) -> None:
    assert set(stack.procs) == {"entra", "keyvault", "dataverse", "wave", "devhost"}
    assert all(p.alive() for p in stack.procs.values())
    assert requests.get(f"{stack.devhost_url}/api/health", timeout=5).status_code == 200
    old_pid = stack.procs["devhost"].proc.pid

    stack.kill_devhost()
    assert stack.procs["devhost"].proc.returncode == -9
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{stack.devhost_url}/api/health", timeout=5)

    stack.restart_devhost()
    assert stack.procs["devhost"].proc.pid != old_pid
    assert requests.get(f"{stack.devhost_url}/api/health", timeout=5).status_code == 200
    assert stack.procs["devhost"].log.exists()


def test_admin_page_is_served_without_any_key(stack: Stack) -> None:
    page = requests.get(stack.admin_page_url(ACCOUNT), timeout=5)
    assert page.status_code == 200 and "Microsoft Dynamics 365" in page.text
    for asset in ("dynamics365.js", "dynamics365.css"):
        res = requests.get(f"{stack.wave_url}/integrations/assets/{asset}", timeout=5)
        assert res.status_code == 200
        assert stack.function_key not in res.text
    assert stack.function_key not in page.text
    assert requests.get(f"{stack.wave_url}/integrations/assets/../wave_admin/__init__.py", timeout=5).status_code == 404


def wave_user(stack: Stack, email: str = "admin@wave.test") -> requests.Session:
    """A browser signed in to Wave (the stand-in's sign-in form), sending Origin as browsers do."""
    browser = requests.Session()
    browser.trust_env = False
    browser.headers["Origin"] = stack.wave_url
    res = browser.post(f"{stack.wave_url}/integrations/login", allow_redirects=False, timeout=10,
                       data={"email": email, "next": urlsplit(stack.admin_page_url(ACCOUNT)).path})
    assert res.status_code == 303, res.text
    cookie = res.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    return browser


def add_wave_admin(stack: Stack, email: str, accounts: list[str] | None) -> None:
    res = requests.post(f"{stack.wave_url}/_control/admins", json={"email": email, "accounts": accounts}, timeout=10)
    res.raise_for_status()


def test_page_backend_adds_the_key_the_browser_does_not_have(stack: Stack) -> None:
    # Directly, without the key, the connections API refuses; through Wave's backend the same call works.
    assert requests.get(f"{stack.devhost_url}/api/connections/{ACCOUNT}", timeout=5).status_code == 401
    res = wave_user(stack).get(f"{stack.admin_page_url(ACCOUNT)}/api/status", timeout=10)
    assert res.status_code == 200
    assert res.json()["state"] in ("not_connected", "disconnected", "pending")
    assert res.json()["wave_user"] == "admin@wave.test"
    assert stack.function_key not in res.text


def test_page_backend_refuses_without_a_session_from_another_site_or_for_another_account(stack: Stack) -> None:
    api = f"{stack.admin_page_url(ACCOUNT)}/api"
    anonymous = requests.post(f"{api}/connect", json={"instance_url": stack.dataverse_url},
                              headers={"Origin": stack.wave_url}, timeout=10)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "not_signed_in"
    assert requests.get(f"{api}/status", timeout=10).status_code == 401

    browser = wave_user(stack)
    for origin in ("https://evil.example", "null", ""):
        cross = browser.post(f"{api}/disconnect", headers={"Origin": origin}, timeout=10)
        assert cross.status_code == 403 and cross.json()["error"]["code"] == "cross_site", origin
    add_wave_admin(stack, "other-admin@wave.test", ["acct_someone_else"])
    foreign = wave_user(stack, "other-admin@wave.test").get(f"{api}/status", timeout=10)
    assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "not_an_admin"
    unknown = requests.post(f"{stack.wave_url}/integrations/login", data={"email": "nobody@wave.test"},
                            headers={"Origin": stack.wave_url}, allow_redirects=False, timeout=10)
    assert unknown.status_code == 401 and "Set-Cookie" not in unknown.headers


def test_page_backend_passes_the_apis_errors_through_and_sets_what_wave_knows(stack: Stack) -> None:
    browser = wave_user(stack)
    res = browser.post(f"{stack.admin_page_url(ACCOUNT)}/api/connect", timeout=10,
                       json={"instance_url": "https://169.254.169.254/", "auto_sync": True, "plan": "free"})
    assert res.status_code == 400
    assert res.json()["error"]["code"] == "invalid_instance_url"

    res = browser.post(f"{stack.admin_page_url(ACCOUNT)}/api/connect", data=b"not json", timeout=10)
    assert res.status_code == 400 and res.json()["error"]["code"] == "invalid_json"

    # The plan comes from Wave's side (eligible here), not from the browser's "free": the call succeeds
    # and the sign-in returns to the admin page.
    res = browser.post(f"{stack.admin_page_url(ACCOUNT)}/api/connect", timeout=10,
                       json={"instance_url": stack.dataverse_url, "auto_sync": False, "plan": "free"})
    assert res.status_code == 200, res.text
    assert "authorize" in res.json()["authorize_url"]
    assert browser.get(f"{stack.admin_page_url(ACCOUNT)}/api/nothing", timeout=5).status_code == 404


def test_wave_confirms_a_sign_in_only_for_the_user_who_started_it(stack: Stack) -> None:
    account = "acct_stack_confirm"
    api = f"{stack.admin_page_url(account)}/api"
    starter = wave_user(stack)
    add_wave_admin(stack, "co-admin@wave.test", [account])  # administers the account, did not press Connect
    co_admin = wave_user(stack, "co-admin@wave.test")
    started = starter.post(f"{api}/connect", json={"instance_url": stack.dataverse_url}, timeout=10)
    assert started.status_code == 200, started.text

    url = started.json()["authorize_url"]
    sign_in = requests.Session()
    sign_in.trust_env = False
    sign_in.verify = str(stack.certs.bundle)
    while not url.startswith(stack.admin_page_url(account)):  # Entra stand-in -> callback -> Wave's page
        hop = sign_in.get(url, allow_redirects=False, timeout=30)
        assert hop.status_code == 302, hop.text
        url = urljoin(url, hop.headers["Location"])
    (completion,) = parse_qs(urlsplit(url).query)["completion"]

    refused = co_admin.post(f"{api}/confirm", json={"completion": completion}, timeout=30)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_initiator"
    assert starter.get(f"{api}/status", timeout=10).json()["state"] == "pending"
    done = starter.post(f"{api}/confirm", json={"completion": completion}, timeout=30)
    assert done.status_code == 200, done.text
    assert (done.json()["state"], done.json()["initiated_by"]) == ("connected", "admin@wave.test")
    gone = starter.post(f"{api}/disconnect", timeout=30)
    assert gone.status_code == 200 and gone.json()["disconnected_by"] == "admin@wave.test"
