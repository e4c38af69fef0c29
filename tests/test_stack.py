"""devstack/stack.py and the Wave admin page's backend, through their HTTP surfaces.

The stack is separate processes on free ports; the app runs as several dev host instances grouped as Flex
Consumption scales it (the HTTP functions together behind one front, each queue function on its own), and
any instance survives a SIGKILL by being restarted on its port; the admin page's backend forwards to the
connections API with the function key, which never reaches the browser, and only for a signed-in Wave user
who administers the account, from Wave's own origin.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest
import requests

from devstack.devhost import scale_group, select_functions
from devstack.stack import MAX_INSTANCES, Instances, Stack, StackOptions

ACCOUNT = "acct_stack_test"
LAYOUT = Instances(http=2, queue=1)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack(StackOptions(name="test-stack", instances=LAYOUT)) as s:
        yield s


def host_status(stack: Stack, name: str) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{stack.procs[name].port}/admin/host/status",
                        headers={"x-functions-key": stack.master_key}, timeout=5)


def handled(stack: Stack, name: str, function: str) -> int:
    """How many HTTP invocations of `function` an instance has logged."""
    needle = json.dumps({"function": function})[1:-1]
    return sum(needle in line and '"kind": "http"' in line
               for line in stack.procs[name].log.read_text(errors="replace").splitlines())


def test_the_app_runs_as_instances_grouped_as_flex_consumption_scales_it(stack: Stack) -> None:
    app = {"http-1", "http-2", "contact_worker-1", "backfill_worker-1"}
    assert set(stack.procs) == {"entra", "keyvault", "dataverse", "wave", "front", *app}
    assert all(p.alive() for p in stack.procs.values())
    assert set(stack.instance_names()) == app

    statuses = {name: host_status(stack, name).json() for name in app}
    serving = {name: set(status["serving"]) for name, status in statuses.items()}
    # The queue triggers each instance polls: only its own function's.
    assert {name: set(status["inFlight"]) for name, status in statuses.items()} == {
        "http-1": set(), "http-2": set(), "contact_worker-1": {"contact_worker"},
        "backfill_worker-1": {"backfill_worker"}}
    functions = stack.functions
    http = {n for n, f in functions.items() if f["group"] == "http"}
    timers = {n for n, f in functions.items() if f["trigger"] == "timerTrigger"}
    assert {"health", "wave_webhook", "contact_worker", "backfill_worker"} <= set(functions)
    assert functions["contact_worker"]["group"] == "function:contact_worker"
    assert serving["http-1"] == http | timers  # the timers fire on one instance only
    assert serving["http-2"] == http
    assert serving["contact_worker-1"] == {"contact_worker"}
    assert serving["backfill_worker-1"] == {"backfill_worker"}
    assert stack.instance_names("http") == ["http-1", "http-2"]
    assert stack.instance_names("backfill_worker") == ["backfill_worker-1"]

    # A queue function's instance serves no route: nobody's requests go to it.
    queue_instance = f"http://127.0.0.1:{stack.procs['contact_worker-1'].port}"
    assert requests.get(f"{queue_instance}/api/health", timeout=5).status_code == 404
    assert host_status(stack, "contact_worker-1").status_code == 200
    assert requests.get(f"{queue_instance}/admin/host/status", timeout=5).status_code == 401


def test_the_front_spreads_requests_over_the_http_instances_and_skips_a_dead_one(stack: Stack) -> None:
    before = {name: handled(stack, name, "health") for name in ("http-1", "http-2")}
    for _ in range(6):
        assert requests.get(f"{stack.devhost_url}/api/health", timeout=5).status_code == 200
    after = {name: handled(stack, name, "health") for name in ("http-1", "http-2")}
    assert {name: after[name] - before[name] for name in after} == {"http-1": 3, "http-2": 3}

    old_pid = stack.procs["http-1"].proc.pid
    stack.kill_instance("http-1")
    assert stack.procs["http-1"].proc.returncode == -9
    stack.check_alive()  # killed on purpose: not a crash
    for _ in range(4):  # every request lands on the instance still running
        assert requests.get(f"{stack.devhost_url}/api/health", timeout=5).status_code == 200

    stack.kill_instance("http-2")
    down = requests.get(f"{stack.devhost_url}/api/health", timeout=5)
    assert down.status_code == 503 and down.json()["error"]["code"] == "no_instance"

    stack.restart_instance("http-1")
    stack.restart_instance("http-2")
    assert stack.procs["http-1"].proc.pid != old_pid
    assert set(host_status(stack, "http-1").json()["serving"]) >= {"health", "purge_expired_sign_ins"}
    assert requests.get(f"{stack.devhost_url}/api/health", timeout=5).status_code == 200


def test_every_instance_comes_back_after_the_whole_app_is_killed(stack: Stack) -> None:
    pids = {name: stack.procs[name].proc.pid for name in stack.instance_names()}
    stack.kill_devhost()
    assert all(stack.procs[name].proc.returncode == -9 for name in pids)
    assert requests.get(f"{stack.devhost_url}/api/health", timeout=5).status_code == 503

    stack.restart_devhost()
    assert all(stack.procs[name].proc.pid != pid and stack.procs[name].alive() for name, pid in pids.items())
    assert requests.get(f"{stack.devhost_url}/api/health", timeout=5).status_code == 200
    stack.check_alive()


@pytest.mark.parametrize(("spec", "expected"), [
    ("1", Instances(http=1, queue=1)),
    (" 3 ", Instances(http=1, queue=3)),
    ("http=2", Instances(http=2, queue=1)),
    ("http=2,queue=3,backfill_worker=1", Instances(http=2, queue=3, per_function=(("backfill_worker", 1),))),
    ("contact_worker=2, backfill_worker=4", Instances(per_function=(("backfill_worker", 4), ("contact_worker", 2)))),
    (str(MAX_INSTANCES), Instances(queue=MAX_INSTANCES)),
])
def test_an_instance_layout_is_read_from_its_spec(spec: str, expected: Instances) -> None:
    layout = Instances.parse(spec)
    assert layout == expected
    assert Instances.parse(str(layout)) == layout
    assert layout.count("backfill_worker") == dict(expected.per_function).get("backfill_worker", expected.queue)


@pytest.mark.parametrize(("spec", "named"), [
    ("", "empty"),
    ("0", "'0'"),
    ("-1", "'-1'"),
    ("two", "'two'"),
    (str(MAX_INSTANCES + 1), f"'{MAX_INSTANCES + 1}'"),
    ("http=0", "http='0'"),
    ("http=1,http=2", "http is given twice"),
    ("http", "'http'"),
    ("http=2,", "''"),
    ("1,2", "'1'"),
    ("contact-worker=2", "'contact-worker=2'"),
    ("queue=1.5", "queue='1.5'"),
])
def test_a_malformed_instance_spec_is_refused_naming_the_part(spec: str, named: str) -> None:
    with pytest.raises(ValueError, match="instances: .*" + named.replace(".", r"\.")):
        Instances.parse(spec)


def test_an_instance_serves_what_its_selectors_name() -> None:
    functions = {"health": "httpTrigger", "webhook": "httpTrigger", "contact_worker": "queueTrigger",
                 "backfill_worker": "queueTrigger", "nightly": "timerTrigger"}
    assert select_functions(functions, ["all"]) == set(functions)
    assert select_functions(functions, ["http"]) == {"health", "webhook"}
    assert select_functions(functions, ["http", "timers"]) == {"health", "webhook", "nightly"}
    assert select_functions(functions, ["contact_worker"]) == {"contact_worker"}
    with pytest.raises(ValueError, match="no function or group 'contact_workers'"):
        select_functions(functions, ["contact_workers"])
    assert [scale_group(n, t) for n, t in functions.items()] == [
        "http", "http", "function:contact_worker", "function:backfill_worker", "function:nightly"]


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
