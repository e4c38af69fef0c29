"""The whole local stack as separate processes on free loopback ports.

Azurite, the Entra stand-in (oauth2-mock-server), the Key Vault, Dataverse and Wave simulators, and the
app as several dev host processes (`python -m devstack.devhost --functions ...`), grouped as Flex
Consumption scales it (https://learn.microsoft.com/azure/azure-functions/flex-consumption-plan#per-function-scaling):
the HTTP functions together on the `http` instances behind one front port (devstack/front.py, round robin),
each queue function on its own instances; one HTTP instance also runs the timers, since in Azure a timer
fires on one instance only. Every instance shares Azurite and the simulators and gets the environment the
app reads in Azure plus the development overrides. Each process logs to .devstack/<run>/<name>.log (or
.devstack/<run>-<pid>/ while another live process uses that folder). Any instance can be killed (SIGKILL)
and restarted on its port, which is what the chaos test does.

    with Stack(StackOptions(instances=Instances.parse("http=2,queue=2"))) as stack:
        stack.devhost_url, stack.wave_url, stack.dataverse_url, stack.admin_page_url(account)
        stack.kill_instance("backfill_worker-1"); stack.restart_instance("backfill_worker-1")
        stack.restart_devhost(kill=True)  # every instance
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import requests

from devstack.certs import TestCerts, make_certs
from devstack.devhost import THREAD_COUNT_SETTING, design_thread_count
from devstack.entra import EntraStandIn, start_entra
from devstack.processes import ROOT, Azurite, StackError, free_port, start_azurite, stop_process, wait_for_port

STATE_DIR = ROOT / ".devstack"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"


MAX_INSTANCES = 16  # per group: each instance is a process with its own worker pool


@dataclass(frozen=True)
class Instances:
    """How many instances of each scale group the stack runs: `http` for the HTTP group, `queue` for each
    queue (non-HTTP, non-timer) function unless `per_function` names it."""

    http: int = 1
    queue: int = 1
    per_function: tuple[tuple[str, int], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Instances:
        """`N` (N instances of each queue function, one HTTP instance) or comma-separated `group=N` with
        group `http`, `queue` (every queue function) or a function's name: `http=2,queue=1,backfill_worker=3`.
        A malformed spec is a ValueError naming the part."""
        text = text.strip()
        if not text:
            raise ValueError("instances: empty (give N or group=N,...)")
        if "=" not in text and "," not in text:
            return cls(queue=_count("queue", text))
        counts: dict[str, int] = {}
        for part in text.split(","):
            key, sep, value = (x.strip() for x in part.partition("="))
            if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key):
                raise ValueError(f"instances: {part.strip()!r} is not group=N (group: http, queue or a function name)")
            if key in counts:
                raise ValueError(f"instances: {key} is given twice")
            counts[key] = _count(key, value)
        http, queue = counts.pop("http", 1), counts.pop("queue", 1)
        return cls(http=http, queue=queue, per_function=tuple(sorted(counts.items())))

    def count(self, function: str) -> int:
        return dict(self.per_function).get(function, self.queue)

    def __str__(self) -> str:
        return ",".join([f"http={self.http}", f"queue={self.queue}", *(f"{k}={v}" for k, v in self.per_function)])


def _count(key: str, value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= MAX_INSTANCES:
        raise ValueError(f"instances: {key}={value!r} must be a whole number from 1 to {MAX_INSTANCES}")
    return int(value)


@dataclass
class StackOptions:
    """What differs between the demo, the browser test, the benchmarks and the chaos run."""

    name: str = "stack"  # the log folder under .devstack/
    lease_seconds: int = 600  # the dev host's peek-lock lease (short for chaos: a killed worker's lease expires)
    dataverse_args: list[str] = field(default_factory=list)  # extra flags for devstack.dataverse_sim
    wave_args: list[str] = field(default_factory=list)  # extra flags for devstack.wave_sim
    devhost_env: dict[str, str] = field(default_factory=dict)  # extra environment for every app instance
    instances: Instances = Instances()  # how many app instances per scale group
    webhook_secret: str = "whsec_local_" + "0123456789abcdef"
    wave_api_token: str = "wave-api-token-local"


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen
    port: int
    log: Path
    argv: list[str]
    env: dict[str, str] | None = None
    functions: str = ""  # an app instance: the dev host's --functions; empty for the other processes
    serving: frozenset[str] = frozenset()  # an app instance: the functions it runs, as it reports them

    def alive(self) -> bool:
        return self.proc.poll() is None


class Stack:
    def __init__(self, options: StackOptions | None = None) -> None:
        self.options = options or StackOptions()
        self.dir = STATE_DIR / self.options.name
        self.procs: dict[str, Proc] = {}
        self.azurite: Azurite | None = None
        self.certs: TestCerts | None = None
        self.function_key = "fk-" + secrets.token_hex(16)
        self.master_key = "mk-" + secrets.token_hex(16)
        self.client_secret = "cs-" + secrets.token_hex(16)
        self.devhost_env: dict[str, str] = {}
        self.devhost_port = free_port()  # the front of the HTTP group: every caller's URL for the app
        self.functions: dict[str, dict[str, str]] = {}  # name -> {"trigger", "group"}, as the app declares them
        self._down: set[str] = set()  # instances killed on purpose and not restarted (yet)
        self.entra: EntraStandIn | None = None
        self._logs: list[IO[bytes]] = []

    # -- URLs ---------------------------------------------------------------------------------------

    def url(self, name: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.procs[name].port}"

    @property
    def devhost_url(self) -> str:
        return f"http://127.0.0.1:{self.devhost_port}"

    @property
    def wave_url(self) -> str:
        return self.url("wave")

    @property
    def dataverse_url(self) -> str:
        return self.url("dataverse", "https")

    @property
    def keyvault_url(self) -> str:
        return self.url("keyvault", "https")

    @property
    def entra_authority(self) -> str:
        assert self.entra is not None
        return self.entra.authority

    @property
    def callback_url(self) -> str:
        return f"http://127.0.0.1:{self.devhost_port}/api/oauth/callback"

    def admin_page_url(self, account_id: str) -> str:
        return f"{self.wave_url}/integrations/dynamics365/{account_id}"

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> Stack:
        if _held_by_another_process(self.dir):  # a concurrent run (another terminal, another engineer)
            self.dir = self.dir.with_name(f"{self.dir.name}-{os.getpid()}")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        (self.dir / "owner.pid").write_text(str(os.getpid()))
        try:
            self.certs = make_certs(STATE_DIR / "certs")
            self.azurite = start_azurite(log_file=self.dir / "azurite.log")
            self._start_entra()
            self._start_keyvault()
            self._start_dataverse()
            self._start_wave()
            self._start_app()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            stop_process(self.procs[name].proc, grace=5.0)
        self.procs.clear()
        if self.azurite is not None:
            self.azurite.stop()
            self.azurite = None
        for f in self._logs:
            f.close()
        self._logs.clear()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- processes ----------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None,
               cwd: Path = ROOT, timeout: float = 30.0) -> Proc:
        log_path = self.dir / f"{name}.log"
        out = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._logs.append(out)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=full_env)
        entry = Proc(name, proc, port, log_path, argv, env)
        self.procs[name] = entry
        try:
            wait_for_port(port, proc, timeout=timeout, name=name)
        except StackError as exc:
            raise StackError(f"{exc}; see {log_path}:\n{tail(log_path)}") from None
        return entry

    def _python(self, module: str, *args: str) -> list[str]:
        return [sys.executable, "-m", module, *args]

    def _start_entra(self) -> None:
        assert self.certs is not None
        entra = start_entra(self.certs, client_id=CLIENT_ID, client_secret=self.client_secret,
                            redirect_uris=(self.callback_url,), log_file=self.dir / "entra.log")
        self.entra = entra
        self.procs["entra"] = Proc("entra", entra.proc, entra.port, self.dir / "entra.log", [])

    def _start_keyvault(self) -> None:
        assert self.certs is not None
        port = free_port()
        self._spawn("keyvault", self._python(
            "devstack.keyvault_sim", "--port", str(port), "--cert", str(self.certs.server_cert),
            "--key", str(self.certs.server_key), "--jwks-url", self.entra.jwks_url,
        ), port)

    def _start_dataverse(self) -> None:
        assert self.certs is not None
        port = free_port()
        self._spawn("dataverse", self._python(
            "devstack.dataverse_sim", "--port", str(port), "--https", "--cert", str(self.certs.server_cert),
            "--key", str(self.certs.server_key), *self.options.dataverse_args,
        ), port)

    def _start_wave(self) -> None:
        """The Wave simulator with the admin page mounted (devstack/wave_admin/__main__.py)."""
        port = free_port()
        self._spawn("wave", self._python(
            "devstack.wave_admin", "--port", str(port), "--token", self.options.wave_api_token,
            "--secrets", self.options.webhook_secret, "--webhook-url", f"{self.devhost_url}/api/webhooks/wave",
            "--connections-api", self.devhost_url, *self.options.wave_args,
        ), port, env={"WAVE_ADMIN_FUNCTION_KEY": self.function_key})

    def _devhost_environment(self) -> dict[str, str]:
        assert self.azurite is not None and self.certs is not None
        dataverse_host = f"127.0.0.1:{self.procs['dataverse'].port}"
        return {
            "APP_ENV": "development",
            "AzureWebJobsStorage": self.azurite.connection_string,
            "DEV_ENTRA_AUTHORITY": self.entra_authority,
            "DEV_CA_BUNDLE": str(self.certs.bundle),
            "DEV_ALLOWED_INSTANCE_HOSTS": dataverse_host,
            "KEY_VAULT_URL": self.keyvault_url,
            "WAVE_API_BASE_URL": self.wave_url,
            "WAVE_API_TOKEN": self.options.wave_api_token,
            "WAVE_WEBHOOK_SECRETS": self.options.webhook_secret,
            "WAVE_RETURN_URL_PREFIXES": f"{self.wave_url}/integrations/",
            "DYNAMICS_CLIENT_ID": CLIENT_ID,
            "DYNAMICS_CLIENT_SECRET": self.client_secret,
            "OAUTH_REDIRECT_URI": self.callback_url,
            "DEVHOST_FUNCTION_KEY": self.function_key,
            "DEVHOST_MASTER_KEY": self.master_key,
            "DEVHOST_LEASE_SECONDS": str(self.options.lease_seconds),
            # The worker pool the app is deployed with, so a local run is no more concurrent than Azure.
            THREAD_COUNT_SETTING: str(design_thread_count()),
            # The app's own HTTPS clients (requests, azure-core) trust the test CA through this bundle.
            "REQUESTS_CA_BUNDLE": str(self.certs.bundle),
            "SSL_CERT_FILE": str(self.certs.bundle),
            **self.options.devhost_env,
        }

    # -- the app's instances --------------------------------------------------------------------------

    @property
    def instances(self) -> list[Proc]:
        """Every app instance (dev host process), HTTP group first."""
        return [p for p in self.procs.values() if p.functions]

    def instance_names(self, function: str | None = None) -> list[str]:
        """The app instances, or those serving `function` (a function's name, or `http` for the HTTP group)."""
        if function == "http":
            return [p.name for p in self.instances
                    if any(self.functions[f]["group"] == "http" for f in p.serving)]
        return [p.name for p in self.instances if function is None or function in p.serving]

    def instance_logs(self, function: str | None = None) -> list[Path]:
        return [self.procs[name].log for name in self.instance_names(function)]

    def _start_app(self) -> None:
        """The HTTP group first (its first instance also runs the timers), then, from the function groups it
        reports, the instances of every other function, then the front that spreads requests over the HTTP
        instances."""
        self.devhost_env = self._devhost_environment()
        layout = self.options.instances
        for i in range(1, layout.http + 1):
            self._start_instance(f"http-{i}", "http,timers" if i == 1 else "http")
        own = sorted(name for name, fn in self.functions.items()
                     if fn["group"] != "http" and fn["trigger"] != "timerTrigger")
        unknown = sorted({name for name, _ in layout.per_function} - set(own))
        if unknown:
            raise StackError(f"instances: no queue function {', '.join(unknown)} in the app (it has {', '.join(own)})")
        for name in own:
            for i in range(1, layout.count(name) + 1):
                self._start_instance(f"{name}-{i}", name)
        port = self.devhost_port
        http_ports = [self.procs[n].port for n in self.instance_names("http")]
        self._spawn("front", self._python("devstack.front", "--port", str(port),
                                          *(a for p in http_ports for a in ("--backend", f"127.0.0.1:{p}"))), port)
        wait_http(f"{self.devhost_url}/api/health", timeout=30, proc=self.procs["front"])

    def _start_instance(self, name: str, functions: str) -> None:
        port = free_port()
        entry = self._spawn(name, self._python("devstack.devhost", "--port", str(port), "--functions", functions),
                            port, env=self.devhost_env)
        entry.functions = functions
        self._wait_ready(entry)

    def instance_status(self, name: str) -> dict[str, Any]:
        """An instance's `/admin/host/status`: what it serves and the queue messages it has in flight."""
        res = requests.get(f"http://127.0.0.1:{self.procs[name].port}/admin/host/status",
                           headers={"x-functions-key": self.master_key}, timeout=10)
        res.raise_for_status()
        return res.json()

    def _wait_ready(self, entry: Proc) -> None:
        """Until the instance answers its status (`/admin/host/status`, master key), which says what it serves."""
        status = wait_http(f"http://127.0.0.1:{entry.port}/admin/host/status", timeout=30, proc=entry,
                           headers={"x-functions-key": self.master_key}).json()
        self.functions = status["functions"]
        entry.serving = frozenset(status["serving"])

    def kill_instance(self, name: str) -> None:
        """SIGKILL one instance: no clean shutdown, the messages it had leased stay invisible until their
        lease runs out and another instance (or this one, restarted) takes them (what a crashed worker leaves)."""
        entry = self.procs[name]
        entry.proc.kill()
        entry.proc.wait(10)
        self._down.add(name)

    def restart_instance(self, name: str, kill: bool = True) -> None:
        """Kill (SIGKILL) or stop (SIGTERM) one instance, if it runs, and start it again on its port."""
        entry = self.procs[name]
        if entry.alive():
            if kill:
                entry.proc.kill()
                entry.proc.wait(10)
            else:
                stop_process(entry.proc, grace=10.0)
        deadline = time.monotonic() + 10
        while True:  # the port is free again once the dead process's socket is gone
            try:
                restarted = self._spawn(name, entry.argv, entry.port, env=entry.env)
                break
            except StackError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
        restarted.functions = entry.functions
        self._wait_ready(restarted)
        self._down.discard(name)

    def kill_devhost(self) -> None:
        """SIGKILL every app instance: the whole app down at once (the front answers 503 meanwhile)."""
        for name in self.instance_names():
            self.kill_instance(name)

    def restart_devhost(self, kill: bool = True) -> None:
        """Kill (SIGKILL) or stop (SIGTERM) every app instance and start each again on its port."""
        for name in self.instance_names():
            self.restart_instance(name, kill=kill)
        wait_http(f"{self.devhost_url}/api/health", timeout=30, proc=self.procs["front"])

    def check_alive(self) -> None:
        dead = [f"{p.name} (exit {p.proc.returncode}, log {p.log})" for p in self.procs.values()
                if not p.alive() and p.name not in self._down]
        if dead:
            raise StackError("stack processes died: " + ", ".join(dead))


def _held_by_another_process(directory: Path) -> bool:
    """True while another live process runs a stack out of `directory` (its logs must not be wiped)."""
    try:
        pid = int((directory / "owner.pid").read_text())
    except (OSError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_http(url: str, timeout: float = 30.0, proc: Proc | None = None, **kwargs: object) -> requests.Response:
    """GET url until it answers 200 (or the process dies, or the deadline passes)."""
    deadline = time.monotonic() + timeout
    last: str = ""
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise StackError(f"{proc.name} exited with {proc.proc.returncode}; see {proc.log}:\n{tail(proc.log)}")
        try:
            res = requests.get(url, timeout=2, **kwargs)  # type: ignore[arg-type]
            if res.status_code == 200:
                return res
            last = f"HTTP {res.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise StackError(f"{url} did not answer 200 within {timeout:.0f} s (last: {last})")


# -- the Dataverse simulator's control API (/_sim/...), for seeding users and reading what was written --


def dataverse_control(stack: Stack, method: str, command: str, body: object = None, timeout: float = 60.0) -> object:
    assert stack.certs is not None
    res = requests.request(method, f"{stack.dataverse_url}/_sim/{command}", json=body,
                           verify=str(stack.certs.bundle), timeout=timeout)
    if res.status_code >= 400:
        raise StackError(f"Dataverse simulator /_sim/{command}: HTTP {res.status_code} {res.text[:300]}")
    return res.json()


def dataverse_rows(stack: Stack, entity_set: str = "contacts") -> list[dict]:
    return dataverse_control(stack, "GET", f"rows/{entity_set}")  # type: ignore[return-value]


def dataverse_users(stack: Stack) -> list[dict]:
    return dataverse_rows(stack, "systemusers")


def dataverse_add_user(stack: Stack, email: str, fullname: str, *, disabled: bool = False) -> dict:
    return dataverse_control(stack, "POST", "users",  # type: ignore[return-value]
                             {"email": email, "fullname": fullname, "enabled": not disabled})
