"""The admin's path through Wave's "Integrations → Microsoft Dynamics 365" page in a real browser.

Debian's Chromium driven by Playwright against the whole local stack (separate processes): enter the
instance URL, turn auto-sync on, Connect, pass the Microsoft sign-in redirect (the Entra stand-in sends
the browser straight back), land on the page connected, watch the import finish, Disconnect.
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


def test_admin_connects_watches_import_and_disconnects(stack: Stack, browser_page, screenshot_dir: Path) -> None:
    page = browser_page
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    wave_populate(stack, CONTACTS)

    page.goto(stack.admin_page_url(ACCOUNT))
    state_is(page, "not_connected")
    page.fill("#instance-url", stack.dataverse_url)
    page.check("#auto-sync")
    page.screenshot(path=str(screenshot_dir / "1-before-connect.png"), full_page=True)

    page.click("#connect")
    # Connect -> the Entra stand-in's /authorize -> the app's /api/oauth/callback -> back on Wave's page.
    page.wait_for_url(f"{stack.admin_page_url(ACCOUNT)}?*dynamics=connected*", timeout=30_000)
    state_is(page, "connected")
    assert "Connected to Microsoft Dynamics 365" in page.inner_text("#banner")
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
        "1-before-connect.png", "2-connected.png", "3-import-done.png", "4-disconnected.png"]
