"""devstack/stack.py and the Wave admin page's backend, through their HTTP surfaces.

The stack is separate processes on free ports; the dev host survives a SIGKILL by being restarted on the
same port; the admin page's backend forwards to the connections API with the function key, which never
reaches the browser.
"""

from __future__ import annotations

from collections.abc import Iterator

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


def test_page_backend_adds_the_key_the_browser_does_not_have(stack: Stack) -> None:
    # Directly, without the key, the connections API refuses; through Wave's backend the same call works.
    assert requests.get(f"{stack.devhost_url}/api/connections/{ACCOUNT}", timeout=5).status_code == 401
    res = requests.get(f"{stack.admin_page_url(ACCOUNT)}/api/status", timeout=10)
    assert res.status_code == 200
    assert res.json()["state"] in ("not_connected", "disconnected", "pending")
    assert stack.function_key not in res.text


def test_page_backend_passes_the_apis_errors_through_and_sets_what_wave_knows(stack: Stack) -> None:
    res = requests.post(f"{stack.admin_page_url(ACCOUNT)}/api/connect", timeout=10,
                        json={"instance_url": "https://169.254.169.254/", "auto_sync": True, "plan": "free"})
    assert res.status_code == 400
    assert res.json()["error"]["code"] == "invalid_instance_url"

    res = requests.post(f"{stack.admin_page_url(ACCOUNT)}/api/connect", data=b"not json", timeout=10)
    assert res.status_code == 400 and res.json()["error"] == "invalid_json"

    # The plan comes from Wave's side (eligible here), not from the browser's "free": the call succeeds
    # and the sign-in returns to the admin page.
    res = requests.post(f"{stack.admin_page_url(ACCOUNT)}/api/connect", timeout=10,
                        json={"instance_url": stack.dataverse_url, "auto_sync": False, "plan": "free"})
    assert res.status_code == 200, res.text
    assert "authorize" in res.json()["authorize_url"]
    assert requests.get(f"{stack.admin_page_url(ACCOUNT)}/api/nothing", timeout=5).status_code == 404
