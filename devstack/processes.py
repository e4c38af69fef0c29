"""Start and stop the local stack's processes on free loopback ports."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NODE_BIN = ROOT / "node_modules" / ".bin"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class StackError(RuntimeError):
    """A local-stack process could not be started."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0, name: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{name or proc.args[0]} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise StackError(f"{name or 'process'} did not listen on port {port} within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL: Azurite sometimes lingers for seconds after 'successfully closed'."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


@dataclass
class Azurite:
    proc: subprocess.Popen
    queue_port: int
    table_port: int

    @property
    def connection_string(self) -> str:
        return (
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            f"AccountKey={AZURITE_KEY};"
            f"QueueEndpoint=http://127.0.0.1:{self.queue_port}/devstoreaccount1;"
            f"TableEndpoint=http://127.0.0.1:{self.table_port}/devstoreaccount1;"
        )

    def stop(self) -> None:
        stop_process(self.proc)


def start_azurite(queue_port: int = 0, table_port: int = 0, log_file: Path | None = None) -> Azurite:
    exe = NODE_BIN / "azurite"
    if not exe.exists():
        raise StackError(f"{exe} is missing: run `make deps` (npm packages are not installed)")
    queue_port, table_port = queue_port or free_port(), table_port or free_port()
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [str(exe), "--silent", "--inMemoryPersistence", "--skipApiVersionCheck", "--disableTelemetry",
         "--blobPort", str(free_port()), "--queuePort", str(queue_port), "--tablePort", str(table_port)],
        stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    try:
        wait_for_port(queue_port, proc, name="azurite")
        wait_for_port(table_port, proc, name="azurite")
    except StackError:
        stop_process(proc)
        raise
    return Azurite(proc, queue_port, table_port)
