"""Run the real rmqpool CLI as a subprocess and watch it from outside."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = pathlib.Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def terminate(proc: subprocess.Popen[Any], grace: float = 20) -> None:
    """SIGTERM, then SIGKILL to its process group if it has not exited after `grace`
    seconds (start it with start_new_session=True)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class Pool:
    def __init__(self, handler: str, *args: str, tmp_path: pathlib.Path,
                 env: dict[str, str] | None = None, metrics: bool = True) -> None:
        self.port = free_port() if metrics else 0
        self.log_path = tmp_path / f"pool-{self.port or os.getpid()}-{time.monotonic_ns()}.log"
        self.argv = [sys.executable, "-m", "rmqpool", handler, *args,
                     "--metrics-host", "127.0.0.1", "--metrics-port", str(self.port)]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Pool:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def __enter__(self) -> Pool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observing ----------------------------------------------------------------
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, ""

    def health(self) -> dict[str, Any]:
        status, body = self.get("/healthz")
        return json.loads(body) if status == 200 else {}

    def is_ready(self) -> bool:
        return self.get("/readyz")[0] == 200

    def wait_ready(self, timeout: float = 30) -> None:
        wait_for(lambda: self.is_ready() or self._dead(), timeout, "the pool to be ready")
        assert self.proc is not None and self.proc.poll() is None, self.log()

    def _dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.health().get("workers", [])]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, body = self.get("/metrics")
        assert status == 200, body
        out = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    # -- acting ---------------------------------------------------------------------
    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop_with(self, sig: int, timeout: float) -> tuple[int, float]:
        """Send `sig` and wait for the exit: (exit code, seconds it took)."""
        t0 = time.monotonic()
        self.signal(sig)
        code = self.wait(timeout)
        return code, time.monotonic() - t0

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        if self.proc is not None:
            # Workers outlive a SIGKILLed supervisor briefly; never leave them behind.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if hasattr(self, "_log"):
            self._log.close()


def proc_state(pid: int) -> str | None:
    """The state letter of `pid` from /proc (R, S, Z, ...), or None if it no longer exists."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def is_gone(pid: int) -> bool:
    """True once `pid` has exited (vanished, or a zombie nobody has reaped yet)."""
    return proc_state(pid) in (None, "Z", "X")


def proc_args(pid: int) -> str:
    """The command line `ps` shows for `pid` (the process title), or "" if it is gone."""
    out = subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True)
    return out.stdout.strip()
