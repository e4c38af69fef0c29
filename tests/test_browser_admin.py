"""The admin's path through Wave's "Integrations → Microsoft Dynamics 365" page in a real browser.

Debian's Chromium driven by Playwright against the whole local stack (separate processes): sign in to
Wave, enter the instance URL, turn auto-sync on, Connect, pass the Microsoft sign-in redirect (the Entra
stand-in sends the browser straight back), land on Wave's page, which confirms the sign-in for the signed-in
Wave user, watch the import finish, Disconnect. And the attack the confirm step stops: an authorize URL
forwarded to someone else, completed in a fresh browser that never signed in to Wave.
Screenshots of each step go to test-output/browser/<test name>/.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devstack.stack import Stack, StackOptions, dataverse_rows
from sync.mapping import EXTERNAL_ID_PREFIX

pytestmark = pytest.mark.browser

ACCOUNT = "acct_browser"
CONTACTS = 150


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack(StackOptions(name="browser")) as s:
        yield s


def synced_rows(stack: Stack) -> list[dict]:
    return [r for r in dataverse_rows(stack) if (r.get("externaluseridentifier") or "").startswith(EXTERNAL_ID_PREFIX)]


def wave_populate(stack: Stack, count: int) -> None:
    res = requests.post(f"{stack.wave_url}/_control/accounts/{ACCOUNT}/populate",
                        json={"count": count, "team_members": [None]}, timeout=60)
    res.raise_for_status()


def state_is(page, state: str, timeout: float = 30_000) -> None:
    page.wait_for_function(f"document.getElementById('state').dataset.state === '{state}'", timeout=timeout)


def sign_in_to_wave(page, stack: Stack, account: str, shots: Path | None = None) -> None:
    """The page sends a visitor without a Wave session to Wave's sign-in, which brings them back."""
    page.goto(stack.admin_page_url(account))
    page.wait_for_selector("#sign-in-link", timeout=30_000)
    page.click("#sign-in-link")
    page.fill("#email", "admin@wave.test")
    if shots:
        page.screenshot(path=str(shots / "0-sign-in-to-wave.png"), full_page=True)
    page.click("#sign-in")
    page.wait_for_url(stack.admin_page_url(account), timeout=30_000)
    page.wait_for_function("document.getElementById('wave-user').textContent === 'admin@wave.test'",
                           timeout=30_000)


def test_admin_connects_watches_import_and_disconnects(stack: Stack, browser_page, screenshot_dir: Path) -> None:
    page = browser_page
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    wave_populate(stack, CONTACTS)

    sign_in_to_wave(page, stack, ACCOUNT, screenshot_dir)
    state_is(page, "not_connected")
    page.fill("#instance-url", stack.dataverse_url)
    page.check("#auto-sync")
    page.screenshot(path=str(screenshot_dir / "1-before-connect.png"), full_page=True)

    page.click("#connect")
    # Connect -> the Entra stand-in's /authorize -> the app's /api/oauth/callback -> back on Wave's page,
    # which confirms the sign-in through Wave's backend and takes the one-time code off the address bar.
    state_is(page, "connected")
    assert page.inner_text("#banner") == \
        f"Connected Wave account {ACCOUNT} to {stack.dataverse_url} as admin@contoso.test."
    assert page.url == stack.admin_page_url(ACCOUNT)
    assert page.inner_text("#status-instance") == stack.dataverse_url
    page.screenshot(path=str(screenshot_dir / "2-connected.png"), full_page=True)

    page.wait_for_function("document.getElementById('backfill-state').dataset.state === 'done'", timeout=120_000)
    page.wait_for_function(f"document.getElementById('count-synced').textContent === '{CONTACTS}'", timeout=30_000)
    progress = page.locator("#backfill-progress")
    assert progress.evaluate("p => p.value === p.max")
    assert f"{CONTACTS} of {CONTACTS} contacts" in page.inner_text("#backfill-text")
    assert page.inner_text("#count-failed") == "0"
    page.screenshot(path=str(screenshot_dir / "3-import-done.png"), full_page=True)
    assert len(synced_rows(stack)) == CONTACTS

    page.click("#disconnect")
    state_is(page, "disconnected")
    assert "Disconnected" in page.inner_text("#banner")
    assert page.is_visible("#connect") and page.inner_text("#connect") == "Reconnect"
    page.screenshot(path=str(screenshot_dir / "4-disconnected.png"), full_page=True)
    # Disconnecting stops the sync; the rows already in Dynamics stay.
    assert len(synced_rows(stack)) == CONTACTS

    assert errors == []
    assert sorted(p.name for p in screenshot_dir.iterdir()) == [
        "0-sign-in-to-wave.png", "1-before-connect.png", "2-connected.png", "3-import-done.png",
        "4-disconnected.png"]


VICTIM_ACCOUNT = "acct_browser_attacker"


def test_a_forwarded_authorize_url_finished_in_a_fresh_browser_connects_nothing(
        stack: Stack, browser_page, fresh_browser_page, screenshot_dir: Path) -> None:
    """An admin of Wave account A keeps A's authorize URL and sends it to the admin of another company's
    Dynamics; the victim's browser never touched Wave. Nothing gets connected, no row reaches Dynamics."""
    res = requests.post(f"{stack.wave_url}/_control/accounts/{VICTIM_ACCOUNT}/populate",
                        json={"count": 40, "team_members": [None]}, timeout=60)
    res.raise_for_status()
    before = len(synced_rows(stack))
    attacker = browser_page
    sign_in_to_wave(attacker, stack, VICTIM_ACCOUNT)
    # The attacker's own Wave session starts the connect but does not follow the URL.
    started = attacker.evaluate("""async ([account, instance]) => {
        const res = await fetch(`/integrations/dynamics365/${account}/api/connect`, {
            method: "POST", headers: {"Content-Type": "application/json"},
            body: JSON.stringify({instance_url: instance, auto_sync: true})});
        return await res.json();
    }""", [VICTIM_ACCOUNT, stack.dataverse_url])
    authorize_url = started["authorize_url"]

    victim = fresh_browser_page  # another browser profile: no Wave cookie
    victim.goto(authorize_url)  # Microsoft sign-in -> the app's callback -> Wave's page for account A
    victim.wait_for_selector("#sign-in-link", timeout=30_000)
    assert "a connection is only confirmed for the Wave user who started it" in victim.inner_text("#banner")
    assert "completion=" not in victim.url  # the one-time code is taken off the address bar
    victim.screenshot(path=str(screenshot_dir / "victim-lands-on-wave.png"), full_page=True)

    attacker.reload()
    state_is(attacker, "pending")
    attacker.screenshot(path=str(screenshot_dir / "attacker-sees-nothing-connected.png"), full_page=True)
    status = requests.get(f"{stack.devhost_url}/api/connections/{VICTIM_ACCOUNT}",
                          headers={"x-functions-key": stack.function_key}, timeout=10).json()
    assert status["state"] == "pending" and status["backfill"]["state"] == "idle"
    assert status["pending_sign_in"]["instance_url"] == stack.dataverse_url
    assert len(synced_rows(stack)) == before
