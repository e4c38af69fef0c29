"""devstack/front.py: the HTTP group's front keeps its connections to the instances and reuses them, and
still never sends a request into an instance that is gone (a kept connection it closed is replaced; one
that refuses is skipped for the next), while one that dies answering costs that request a 502.

The instances here are small servers on devstack/http_server.py, as the dev host is: in this process when
only the connections are counted, separate processes when one is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from devstack.front import Backend, Front
from devstack.http_server import make_server
from devstack.processes import ROOT, free_port, wait_for_port

# An instance in its own process: answers its pid, and exits without answering on /die.
INSTANCE = """
import os, sys
from devstack.http_server import make_server
def dispatch(method, path, headers, body):
    if path == "/die":
        os._exit(1)
    return 200, {"Content-Type": "text/plain"}, str(os.getpid()).encode()
make_server(dispatch, "127.0.0.1", int(sys.argv[1])).serve_forever()
"""


class CountingInstance:
    """An in-process instance that counts the connections it was sent requests on (the server starts a
    thread per connection)."""

    def __init__(self) -> None:
        self.threads: set[threading.Thread] = set()
        self.requests = 0
        self._lock = threading.Lock()
        self.server = make_server(self.dispatch, "127.0.0.1", 0)
        self.backend = Backend("127.0.0.1", self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def dispatch(self, method: str, path: str, headers: dict[str, str], body: bytes
                 ) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.threads.add(threading.current_thread())
            self.requests += 1
        return 200, {"Content-Type": "text/plain"}, body or path.encode()


@pytest.fixture
def instances() -> Iterator[list[CountingInstance]]:
    made = [CountingInstance(), CountingInstance()]
    yield made
    for instance in made:
        instance.server.shutdown()
        instance.server.server_close()


def start_instance(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", INSTANCE, str(port)], cwd=ROOT)
    wait_for_port(port, proc, timeout=15, name="instance")
    return proc


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_requests_go_in_turn_over_kept_connections(instances: list[CountingInstance]) -> None:
    front = Front([i.backend for i in instances])
    try:
        answers = [front.dispatch("POST", f"/api/webhooks/wave?n={n}", {"content-type": "text/plain"},
                                  f"event {n}".encode()) for n in range(20)]
        assert [(status, body) for status, _, body in answers] == [(200, f"event {n}".encode()) for n in range(20)]
        assert [i.requests for i in instances] == [10, 10]
        # one request at a time: one connection to each instance, opened once
        assert front.connections_opened == 2 and [len(i.threads) for i in instances] == [1, 1]
    finally:
        front.close()


def test_as_many_connections_are_kept_as_requests_run_at_once(instances: list[CountingInstance]) -> None:
    front = Front([instances[0].backend])
    try:
        start = threading.Barrier(4)
        statuses: list[int] = []

        def post() -> None:
            start.wait()
            statuses.append(front.dispatch("POST", "/x", {}, b"at once")[0])

        threads = [threading.Thread(target=post) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        opened = front.connections_opened
        assert statuses == [200] * 4 and 1 <= opened <= 4
        for _ in range(10):  # afterwards, one at a time: the kept ones carry them
            assert front.dispatch("POST", "/x", {}, b"later")[0] == 200
        assert front.connections_opened == opened
    finally:
        front.close()


def test_a_restarted_instance_gets_the_next_request_on_a_new_connection(processes: list[subprocess.Popen]) -> None:
    port = free_port()
    processes.append(start_instance(port))
    front = Front([Backend("127.0.0.1", port)])
    try:
        status, _, body = front.dispatch("GET", "/", {}, b"")
        assert (status, body) == (200, str(processes[0].pid).encode())
        processes[0].send_signal(signal.SIGKILL)
        processes[0].wait(10)
        # gone: its kept connection is seen to be closed, and a new one is refused: nothing was sent
        status, _, body = front.dispatch("GET", "/", {}, b"")
        assert status == 503 and b"no_instance" in body
        processes.append(start_instance(port))  # restarted on its port, as devstack/stack.py does
        status, _, body = front.dispatch("GET", "/", {}, b"")
        assert (status, body) == (200, str(processes[1].pid).encode())
    finally:
        front.close()


def test_a_killed_instance_is_skipped_for_the_next_one(processes: list[subprocess.Popen]) -> None:
    ports = [free_port(), free_port()]
    processes.extend(start_instance(p) for p in ports)
    front = Front([Backend("127.0.0.1", p) for p in ports])
    try:
        assert {front.dispatch("GET", "/", {}, b"")[2] for _ in range(2)} == {str(p.pid).encode() for p in processes}
        os.kill(processes[0].pid, signal.SIGKILL)
        processes[0].wait(10)
        answers = [front.dispatch("GET", "/", {}, b"") for _ in range(4)]
        assert [(s, b) for s, _, b in answers] == [(200, str(processes[1].pid).encode())] * 4
    finally:
        front.close()


def test_an_instance_dying_while_it_answers_costs_that_request_a_502(processes: list[subprocess.Popen]) -> None:
    port = free_port()
    processes.append(start_instance(port))
    front = Front([Backend("127.0.0.1", port)])
    try:
        assert front.dispatch("GET", "/", {}, b"")[0] == 200
        status, _, body = front.dispatch("POST", "/die", {}, b"event")
        assert status == 502 and b"instance_failed" in body
    finally:
        front.close()
