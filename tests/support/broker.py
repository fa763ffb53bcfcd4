"""A private, throw-away RabbitMQ node for tests that stop or restart a broker.

The shared broker (``rabbit@localhost`` on 5672/25672) must never be touched by
tests.  ``PrivateBroker`` runs a second node with its own name, ports, data,
log and cookie directories under ``tmp_path``:

* it calls ``/usr/lib/rabbitmq/bin/rabbitmq-server`` directly; Debian's
  ``/usr/sbin/rabbitmq-server`` wrapper would ``su`` to the ``rabbitmq`` user,
  who cannot write into pytest's root-owned, mode 0700 ``tmp_path``;
* ``HOME`` points into ``tmp_path`` so the node (and ``ctl()``) use a private
  ``.erlang.cookie``: nothing is written to ``/root`` or ``/var/lib/rabbitmq``;
* ``RABBITMQ_CONF_ENV_FILE`` points to an empty file, so
  ``/etc/rabbitmq/rabbitmq-env.conf`` (``NODENAME=rabbit@localhost``) is not
  read; ``RABBITMQ_CONFIG_FILE`` / ``RABBITMQ_ADVANCED_CONFIG_FILE`` likewise
  replace ``/etc/rabbitmq/rabbitmq.conf`` (which binds 5672);
* no plugins are enabled, so nothing listens on 15672 or other plugin ports;
* the node runs as a child in its own session (not tied to pytest's
  terminal; the test reaps it) and is stopped with SIGTERM to beam.smp, which
  RabbitMQ 3.10 turns into a graceful shutdown (same as ``rabbitmqctl stop``
  without starting the CLI); on failure every process of the node's process
  tree (beam.smp, erl_child_setup, inet_gethost, ...) gets SIGKILL.
* to start faster, ``RABBITMQ_PLUGINS_DIR`` points to a directory that only
  links the applications ``rabbit`` needs: RabbitMQ loads every application of
  the plugins directory and scans all their modules at boot (set
  ``RMQPOOL_TEST_BROKER_SLIM=0`` to disable).
"""

from __future__ import annotations

import collections
import contextlib
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping

import pytest

__all__ = ["PrivateBroker", "BrokerError", "private_broker", "amqp_handshake_ok"]

SERVER_CANDIDATES = ("/usr/lib/rabbitmq/bin/rabbitmq-server",)
CTL_CANDIDATES = ("/usr/lib/rabbitmq/bin/rabbitmqctl",)

# Ports never to hand out: the shared node (AMQP, distribution), epmd,
# management, and the range the rabbitmqctl CLI uses for its own distribution.
_RESERVED_PORTS = {4369, 5671, 5672, 15672, 15692, 25672, *range(35672, 35683)}


class BrokerError(RuntimeError):
    pass


def _find_executable(candidates: tuple[str, ...], name: str) -> str:
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found and not found.startswith(("/usr/sbin/", "/sbin/")):
        # /usr/sbin/rabbitmq-* on Debian are su-wrappers; anything else
        # (e.g. a generic-unix tarball on PATH) runs as the calling user.
        return found
    raise BrokerError(
        f"{name} not found (looked at {', '.join(candidates)} and PATH); "
        "install it with: apt-get install -y rabbitmq-server"
    )


def _free_port(exclude: set[int]) -> int:
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in exclude and port not in _RESERVED_PORTS:
            return port
    raise BrokerError("could not find a free TCP port")


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def amqp_handshake_ok(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> bool:
    """True if something on host:port answers the AMQP 0-9-1 protocol header
    with a Connection.Start method frame (frame type 1, channel 0)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"AMQP\x00\x00\x09\x01")
            header = b""
            while len(header) < 7:
                chunk = s.recv(7 - len(header))
                if not chunk:
                    return False
                header += chunk
            return header[0] == 1 and header[1:3] == b"\x00\x00"
    except OSError:
        return False


def _tail(path: pathlib.Path, lines: int = 40) -> str:
    try:
        with path.open("r", errors="replace") as f:
            return "".join(collections.deque(f, maxlen=lines))
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def _pid_alive(pid: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is [0],
    ppid [1], start time [19]); None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_tree(root: int) -> list[tuple[int, str]]:
    """(pid, start time) of root and all its descendants."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None:
                children[int(st[1])].append(int(entry))
    out: list[tuple[int, str]] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        st = _proc_stat(pid)
        if st is not None:
            out.append((pid, st[19]))
            todo.extend(children.get(pid, ()))
    return out


def _same_process_alive(pid: int, start: str) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[19] == start and st[0] not in ("Z", "X")


def _slim_plugins_dir(server: str, dest: pathlib.Path) -> pathlib.Path | None:
    """Make ``dest`` a plugins dir with symlinks to just ``rabbit`` and its
    (transitive) dependencies found in the real plugins dir.  None if the
    layout is not the expected one."""
    if os.environ.get("RMQPOOL_TEST_BROKER_SLIM", "1") == "0":
        return None
    plugins = pathlib.Path(os.path.realpath(server)).parent.parent / "plugins"
    if not plugins.is_dir():
        return None
    apps: dict[str, pathlib.Path] = {}
    for d in plugins.iterdir():
        m = re.fullmatch(r"([a-z0-9_]+)-[0-9][^/]*", d.name)
        if m and d.is_dir():
            apps[m.group(1)] = d
    wanted, todo = set(), ["rabbit", "rabbitmq_prelaunch", "rabbit_common"]
    while todo:
        app = todo.pop()
        if app in wanted or app not in apps:
            continue
        wanted.add(app)
        try:
            text = (apps[app] / "ebin" / f"{app}.app").read_text(errors="replace")
        except OSError:
            return None
        m = re.search(r"\{\s*applications\s*,\s*\[([^\]]*)\]", text)
        if m:
            todo.extend(a.strip().strip("'") for a in m.group(1).split(",") if a.strip())
    if "rabbit" not in wanted or "rabbitmq_prelaunch" not in wanted:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    for app in sorted(wanted):
        link = dest / apps[app].name
        if not link.exists():
            link.symlink_to(apps[app])
    return dest


class PrivateBroker:
    """A RabbitMQ node of its own (see module docstring).

    >>> b = PrivateBroker(tmp_path); b.start(); ...; b.restart(); ...; b.close()
    """

    def __init__(
        self, tmp_path: pathlib.Path, config: Mapping[str, str] | None = None
    ) -> None:
        self.dir = pathlib.Path(tmp_path) / f"rabbitmq-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir(parents=True)
        self.nodename = f"rmqpool-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = _free_port(set())
        self.dist_port = _free_port({self.port})
        self.extra_config = dict(config or {})
        self.server = _find_executable(SERVER_CANDIDATES, "rabbitmq-server")
        self.mnesia_base = self.dir / "mnesia"
        self.log_base = self.dir / "log"
        self.pid_file = self.dir / "rabbitmq.pid"
        self.console_log = self.dir / "console.log"
        self.log_file = self.log_base / f"{self.nodename}.log"
        self.config_file = self.dir / "rabbitmq.conf"
        self.plugins_file = self.dir / "enabled_plugins"
        self.conf_env_file = self.dir / "rabbitmq-env.conf"
        for d in (self.mnesia_base, self.log_base):
            d.mkdir()
        self.plugins_file.write_text("[].\n")
        self.conf_env_file.write_text("# intentionally empty: do not read /etc/rabbitmq\n")
        self.plugins_dir = _slim_plugins_dir(self.server, self.dir / "plugins")
        self._write_config()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._started_once = False
        self.last_start_seconds: float | None = None
        self.last_stop_seconds: float | None = None

    # -- public API -------------------------------------------------------

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """OS pid of the node's beam.smp (from its pid file), if running."""
        return self._pid

    def start(self, timeout: float = 60) -> None:
        if self.running:
            raise BrokerError(f"{self.nodename} is already running")
        attempts = 1 if self._started_once else 3
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                self._started_once = True
                return
            except _PortClash:
                if attempt == attempts - 1:
                    raise
                # Another process took one of our ports between picking and
                # binding: pick new ones (only before the first successful start).
                self.port = _free_port(set())
                self.dist_port = _free_port({self.port})
                self._write_config()

    def stop(self, timeout: float = 60) -> None:
        """Graceful stop (SIGTERM to beam.smp, like ``rabbitmqctl stop``); waits
        until the node and its helper processes are gone and the port is closed."""
        proc = self._proc
        if proc is None:
            return
        t0 = time.monotonic()
        deadline = t0 + timeout
        tree = _process_tree(proc.pid)  # wrapper sh, beam.smp, erl_child_setup, ...
        pid = self._pid or self._read_pid()
        if proc.poll() is None:
            if pid and _pid_alive(pid):
                os.kill(pid, signal.SIGTERM)  # graceful shutdown in RabbitMQ >= 3.8
            else:
                os.killpg(proc.pid, signal.SIGTERM)  # the wrapper forwards it
        try:
            # The wrapper exits once beam.smp has fully exited (all threads).
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise BrokerError(
                f"{self.nodename} did not stop within {timeout}s\n{self.diagnostics()}"
            ) from None
        self._finish(tree, deadline)
        self.last_stop_seconds = time.monotonic() - t0

    def restart(self) -> None:
        """Graceful stop, then start on the same ports and data directory."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """Crash the node (SIGKILL to all its processes); start() recovers it."""
        proc = self._proc
        if proc is None:
            return
        tree = _process_tree(proc.pid)
        for pid, start in reversed(tree):  # beam.smp and helpers first, wrapper last
            if pid != proc.pid and _same_process_alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        try:
            proc.wait(timeout=10)  # the wrapper's `wait` returns once beam is reaped
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        self._finish(tree, time.monotonic() + 10)
        self.pid_file.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the node if running; idempotent; kills it if stopping fails."""
        if self._proc is None:
            return
        try:
            self.stop(timeout=30)
        except Exception:
            self.kill()

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """Run ``rabbitmqctl -n <node> *args`` against this node; returns stdout."""
        ctl = _find_executable(CTL_CANDIDATES, "rabbitmqctl")
        res = subprocess.run(
            [ctl, "-n", self.nodename, *args],
            env=self._env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if res.returncode != 0:
            raise BrokerError(f"rabbitmqctl {' '.join(args)} failed ({res.returncode}):\n"
                              f"{res.stdout}\n{res.stderr}")
        return res.stdout

    def diagnostics(self) -> str:
        return (
            f"--- {self.console_log} (tail) ---\n{_tail(self.console_log)}\n"
            f"--- {self.log_file} (tail) ---\n{_tail(self.log_file)}"
        )

    def __enter__(self) -> PrivateBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PrivateBroker {self.nodename} port={self.port} running={self.running}>"

    # -- internals --------------------------------------------------------

    def _write_config(self) -> None:
        lines = {
            "listeners.tcp.1": f"127.0.0.1:{self.port}",
            "log.console": "false",
            "log.file.level": "info",
            **self.extra_config,
        }
        self.config_file.write_text("".join(f"{k} = {v}\n" for k, v in lines.items()))

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_"))  # incl. ERL_FLAGS, ERL_LIBS
        }
        env.update(
            HOME=str(self.dir),  # private ~/.erlang.cookie
            LC_ALL="C.UTF-8",
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_CRASH_DUMP=str(self.dir / "erl_crash.dump"),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.mnesia_base),
            RABBITMQ_MNESIA_DIR=str(self.mnesia_base / self.nodename),
            RABBITMQ_LOG_BASE=str(self.log_base),
            RABBITMQ_PID_FILE=str(self.pid_file),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.plugins_file),
            RABBITMQ_CONFIG_FILE=str(self.config_file),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),  # absent
            RABBITMQ_CONF_ENV_FILE=str(self.conf_env_file),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        if self.plugins_dir is not None:
            env["RABBITMQ_PLUGINS_DIR"] = str(self.plugins_dir)
        return env

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _start_once(self, timeout: float) -> None:
        for port in (self.port, self.dist_port):
            if _port_open(port):
                raise _PortClash(f"port {port} is already in use")
        t0 = time.monotonic()
        deadline = t0 + timeout
        self.pid_file.unlink(missing_ok=True)
        with self.console_log.open("ab") as out:
            self._proc = subprocess.Popen(
                [self.server],
                env=self._env(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: killpg() reaches helpers
            )
        try:
            while True:
                rc = self._proc.poll()
                if rc is not None:
                    diag = self.diagnostics()
                    self._finish(_process_tree(self._proc.pid), time.monotonic() + 5,
                                 check_port=False)
                    if "eaddrinuse" in diag.lower() and not self._started_once:
                        raise _PortClash(diag)
                    raise BrokerError(
                        f"{self.nodename} exited with status {rc} during start\n{diag}"
                    )
                if self._pid is None:
                    self._pid = self._read_pid()
                if self._pid is not None and amqp_handshake_ok(self.port):
                    break
                if time.monotonic() > deadline:
                    raise BrokerError(
                        f"{self.nodename} did not accept AMQP on port {self.port} "
                        f"within {timeout}s\n{self.diagnostics()}"
                    )
                time.sleep(0.05)
        except BaseException:
            if self._proc is not None:
                self.kill()
            raise
        self.last_start_seconds = time.monotonic() - t0

    def _finish(self, tree: list[tuple[int, str]], deadline: float, check_port: bool = True
                ) -> None:
        """After the wrapper exited: make sure no process of the node's tree
        survives (SIGKILL stragglers at the deadline) and the port is closed."""
        self._proc = None
        self._pid = None
        killed = False
        while True:
            alive = [(p, st) for p, st in tree if _same_process_alive(p, st)]
            if not alive and not (check_port and _port_open(self.port)):
                break
            if time.monotonic() > deadline:
                if alive and not killed:
                    for p, _start in alive:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(p, signal.SIGKILL)
                    killed, deadline = True, time.monotonic() + 5
                    continue
                what = f"pids {[p for p, _ in alive]} still alive" if alive else (
                    f"port {self.port} still open")
                raise BrokerError(f"{self.nodename}: {what} after stopping")
            time.sleep(0.02)


class _PortClash(BrokerError):
    pass


@pytest.fixture
def private_broker(tmp_path: pathlib.Path) -> Iterator[PrivateBroker]:
    """A started PrivateBroker, closed (stopped or killed) at teardown."""
    broker = PrivateBroker(tmp_path)
    try:
        broker.start()
        yield broker
    finally:
        broker.close()
