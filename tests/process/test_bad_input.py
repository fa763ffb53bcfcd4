"""Bad input to the real CLI: bad handler specs and options fail at once (exit 2, one
line, no worker forked); a broker that refuses us or disagrees about the topology is
fatal (exit 3 / 4, no restart loop); an unreachable broker is waited for."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from rmqpool import topology
from tests.support import amqp
from tests.support.pool import ROOT, Pool, free_port, wait_for

HANDLER = "tests.support.handlers:record"


def run_cli(*args: str, env: dict[str, str] | None = None,
            tmp_path: pathlib.Path | None = None) -> tuple[int, str, float]:
    """Run rmqpool to completion: (exit code, stdout + stderr, seconds)."""
    path = str(ROOT) if tmp_path is None else f"{ROOT}{os.pathsep}{tmp_path}"
    full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "rmqpool", *args, "--metrics-port", "0"],
                          cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=20)
    return proc.returncode, proc.stdout.decode(errors="replace"), time.monotonic() - t0


def assert_usage_error(code: int, out: str, elapsed: float, *needles: str) -> None:
    lines = out.strip().splitlines()
    assert code == 2, out
    assert elapsed < 2.0, f"took {elapsed:.2f}s to reject bad input"
    assert len(lines) == 1, f"expected one line, got:\n{out}"
    assert lines[0].startswith("rmqpool: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert "[worker" not in out and "starting" not in out and "Traceback" not in out


# -- handler spec -------------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("spec", ["nocolon", "a:b:c", "mod:", ":func", "my-mod:f"])
def test_malformed_handler_spec(spec):
    code, out, elapsed = run_cli(spec)
    assert_usage_error(code, out, elapsed, repr(spec), "MODULE:FUNCTION")


@pytest.mark.timeout(30)
def test_empty_handler_spec():
    code, out, elapsed = run_cli("")
    assert_usage_error(code, out, elapsed, "no handler given", "MODULE:FUNCTION")


@pytest.mark.timeout(30)
def test_handler_module_not_importable():
    code, out, elapsed = run_cli("no_such_module_rmqpool_xyz:handle")
    assert_usage_error(code, out, elapsed, "cannot import", "'no_such_module_rmqpool_xyz'",
                       "PYTHONPATH")


@pytest.mark.timeout(30)
def test_handler_module_raises_at_import(tmp_path):
    (tmp_path / "raises_at_import.py").write_text(
        "import os\n\nraise RuntimeError('boom while importing')\n")
    code, out, elapsed = run_cli("raises_at_import:handle", tmp_path=tmp_path)
    assert_usage_error(code, out, elapsed, "'raises_at_import'", "RuntimeError",
                       "boom while importing")


@pytest.mark.timeout(30)
def test_handler_module_has_a_syntax_error(tmp_path):
    (tmp_path / "bad_syntax.py").write_text("def handle(body:\n    pass\n")
    code, out, elapsed = run_cli("bad_syntax:handle", tmp_path=tmp_path)
    assert_usage_error(code, out, elapsed, "'bad_syntax'", "SyntaxError", "bad_syntax.py:1")


@pytest.mark.timeout(30)
def test_handler_attribute_missing(tmp_path):
    (tmp_path / "has_other.py").write_text("def other(body):\n    pass\n")
    code, out, elapsed = run_cli("has_other:handle", tmp_path=tmp_path)
    assert_usage_error(code, out, elapsed, "'has_other'", "no attribute", "'handle'")


@pytest.mark.timeout(30)
def test_handler_attribute_not_callable(tmp_path):
    (tmp_path / "not_callable.py").write_text("handle = 42\n")
    code, out, elapsed = run_cli("not_callable:handle", tmp_path=tmp_path)
    assert_usage_error(code, out, elapsed, "'not_callable:handle'", "not a function")


# -- options -------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("args, needles", [
    (["--workers", "0"], ["--workers", "> 0", "got 0"]),
    (["--prefetch", "-1"], ["--prefetch", "> 0", "got -1"]),
    (["--queue-type", "unknown"], ["--queue-type", "'unknown'", "classic", "quorum"]),
    (["--url", "http://127.0.0.1:5672/"], ["--url", "'http'", "amqp://"]),
    (["--workers", "many"], ["--workers", "'many'"]),
    (["--retry-delays", "1s,ten"], ["--retry-delays", "'1s,ten'", "e.g. 1s,10s,1m"]),
    (["--graceful-timeout", "soon"], ["--graceful-timeout", "'soon'", "e.g. 30s"]),
    (["--heartbeat", "1500ms"], ["--heartbeat", "'1500ms'", "whole number of seconds"]),
    (["--queue-arg", "x-max-length"], ["--queue-arg", "KEY=VALUE", "x-max-length=10000"]),
    (["--queue-arg", "x-queue-type=quorum"], ["--queue-arg x-queue-type", "--queue-type"]),
], ids=["workers-0", "prefetch-neg", "queue-type", "url-scheme", "workers-nan", "retry-delays",
        "graceful-timeout", "heartbeat-ms", "queue-arg-no-value", "queue-arg-type"])
def test_bad_option(args, needles):
    code, out, elapsed = run_cli(HANDLER, *args)
    assert_usage_error(code, out, elapsed, *needles)


@pytest.mark.timeout(30)
def test_bad_option_from_env():
    code, out, elapsed = run_cli(HANDLER, env={"RMQPOOL_WORKERS": "0"})
    assert_usage_error(code, out, elapsed, "RMQPOOL_WORKERS", "got 0")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args, flag, guess", [
    (["--wrokers", "2"], "--wrokers", "--workers"),
    (["--wrokers=2"], "--wrokers", "--workers"),
    (["--work", "2"], "--work", "--workers"),  # no abbreviations: a typo must not slip through
    (["--log-levl", "debug"], "--log-levl", "--log-level"),
    (["--queue-args", "a=1"], "--queue-args", "--queue-arg"),
])
def test_unknown_flag_is_a_usage_error_naming_the_closest(args, flag, guess):
    code, out, elapsed = run_cli(HANDLER, *args)
    assert_usage_error(code, out, elapsed, f"unknown option {flag}", f"did you mean {guess}?")


@pytest.mark.timeout(30)
def test_unknown_flag_without_a_close_one():
    code, out, elapsed = run_cli(HANDLER, "--zzzzzz")
    assert_usage_error(code, out, elapsed, "unknown option --zzzzzz", "rmqpool --help")
    assert "did you mean" not in out


@pytest.mark.timeout(30)
def test_unknown_rmqpool_variables_are_warned_about_on_stderr_first():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RMQPOOL_WROKERS": "2", "RMQPOOL_QUEU": "x"}
    proc = subprocess.run([sys.executable, "-m", "rmqpool", HANDLER, "--workers", "0",
                           "--metrics-port", "0"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=20)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.splitlines() == [
        "rmqpool: warning: RMQPOOL_QUEU is not an rmqpool setting and is ignored; "
        "did you mean RMQPOOL_QUEUE?",
        "rmqpool: warning: RMQPOOL_WROKERS is not an rmqpool setting and is ignored; "
        "did you mean RMQPOOL_WORKERS?",
        "rmqpool: error: --workers must be > 0 (got 0); set --workers or RMQPOOL_WORKERS to a "
        "positive number",
    ]


@pytest.mark.timeout(30)
def test_a_misspelt_variable_is_warned_about_before_the_pool_starts(queue, tmp_path):
    with Pool(HANDLER, "--queue", queue, "--workers", "1", tmp_path=tmp_path,
              env={"RMQPOOL_WROKERS": "2", "RECORD_FILE": str(tmp_path / "r")}) as pool:
        pool.wait_ready(15)
        assert len(pool.worker_pids()) == 1  # ignored, as the warning says
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
    first, second = pool.log().splitlines()[:2]
    assert first == ("rmqpool: warning: RMQPOOL_WROKERS is not an rmqpool setting and is "
                     "ignored; did you mean RMQPOOL_WORKERS?")
    assert "starting" in second or "serving" in second, second


@pytest.mark.timeout(30)
def test_durations_with_units(queue, tmp_path):
    with Pool(HANDLER, "--queue", queue, "--workers", "1", "--retry-delays", "1s,10s",
              "--graceful-timeout", "1500ms", "--heartbeat", "2000ms", "--worker-timeout", "1m",
              tmp_path=tmp_path, env={"RMQPOOL_TIME_LIMIT": "1m",
                                      "RECORD_FILE": str(tmp_path / "r")}) as pool:
        pool.wait_ready(15)
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
    assert amqp.count(topology.retry_queue_name(queue, 1)) == 0
    assert amqp.count(topology.retry_queue_name(queue, 10)) == 0


@pytest.mark.timeout(30)
def test_url_password_never_echoed_in_usage_error():
    code, out, elapsed = run_cli(HANDLER, "--url", "http://guest:hunter2-secret@127.0.0.1/")
    assert_usage_error(code, out, elapsed, "--url")
    assert "hunter2" not in out


@pytest.mark.timeout(30)
def test_flag_overrides_env(queue, tmp_path):
    # RMQPOOL_WORKERS=0 alone is refused (above); a flag wins over it, the env over the default.
    env = {"RMQPOOL_WORKERS": "0", "RMQPOOL_PREFETCH": "7", "RECORD_FILE": str(tmp_path / "r")}
    with Pool(HANDLER, "--queue", queue, "--workers", "2", tmp_path=tmp_path, env=env) as pool:
        pool.wait_ready(15)
        assert len(pool.worker_pids()) == 2
        assert pool.metric("rmqpool_workers", state="desired") == 2
        wait_for(lambda: pool.log().count("prefetch 7") == 2, 5, "workers log prefetch 7")
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()


# -- the broker says no ------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_bad_credentials_are_fatal_and_the_password_is_never_printed(queue, tmp_path):
    secret = "wr0ng-Pa55word-xyz"
    t0 = time.monotonic()
    with Pool(HANDLER, "--queue", queue, "--workers", "2",
              "--url", f"amqp://guest:{secret}@127.0.0.1:5672/", tmp_path=tmp_path,
              env={"RECORD_FILE": str(tmp_path / "r")}) as pool:
        code = pool.wait(15)
        elapsed = time.monotonic() - t0
        out = pool.log()
    assert code == 3, out
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert secret not in out
    assert re.search(r"refused the credentials.*fix the user or password", out), out
    assert "guest:***@127.0.0.1" in out
    assert out.count("restarting") == 0, out


@pytest.mark.timeout(30)
def test_unknown_vhost_is_fatal(queue, tmp_path):
    t0 = time.monotonic()
    with Pool(HANDLER, "--queue", queue, "--workers", "2",
              "--url", "amqp://guest:guest@127.0.0.1:5672/no-such-vhost", tmp_path=tmp_path,
              env={"RECORD_FILE": str(tmp_path / "r")}) as pool:
        code = pool.wait(15)
        elapsed = time.monotonic() - t0
        out = pool.log()
    assert code == 3, out
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert "virtual host" in out and "no-such-vhost" in out, out
    assert "guest:guest" not in out
    assert out.count("restarting") == 0, out


@pytest.mark.timeout(30)
def test_queue_with_other_arguments_is_fatal_without_a_restart_loop(queue, tmp_path):
    amqp.declare(queue, arguments={"x-max-length": 5})
    t0 = time.monotonic()
    with Pool(HANDLER, "--queue", queue, "--workers", "2", tmp_path=tmp_path,
              env={"RECORD_FILE": str(tmp_path / "r")}) as pool:
        code = pool.wait(15)
        elapsed = time.monotonic() - t0
        out = pool.log()
    assert code == 4, out
    assert elapsed < 10, f"took {elapsed:.1f}s"
    errors = [line for line in out.splitlines() if "PRECONDITION_FAILED" in line]
    assert errors, out
    assert all(queue in line and "x-max-length" in line for line in errors), errors
    assert out.count("restarting") <= 1, out
    # The queue was not touched.
    assert amqp.count(queue) == 0


@pytest.mark.timeout(30)
def test_a_queue_arg_the_broker_does_not_accept_is_named(queue):
    code, out, _ = run_cli(HANDLER, "--queue", queue, "--workers", "1",
                           "--queue-arg", "x-max-length=-1")
    assert code == 4, out
    assert (f"the broker does not accept --queue-arg x-max-length=-1 for queue '{queue}' "
            "({value_negative,-1}); fix or drop it") in out, out
    assert all(amqp.count(name) is None for name in amqp.pool_queues(queue)), out


def _absent(queue: str, delays: tuple[float, ...] = (1.0, 10.0, 60.0)) -> list[str]:
    return [name for name in amqp.pool_queues(queue, delays)[1:] if amqp.count(name) is None]


@pytest.mark.timeout(40)
def test_a_406_names_the_queue_arg_that_fits_and_following_it_works(queue, tmp_path):
    amqp.declare(queue, arguments={"x-max-length": 5})
    code, out, _ = run_cli(HANDLER, "--queue", queue, "--workers", "1")
    assert code == 4, out
    assert (f"queue '{queue}' has x-max-length=5: run with --queue-arg x-max-length=5 to use it "
            "as it is, or delete it to change it") in out, out
    # The work queue is declared first: its clash created no retry or dead-letter queue.
    assert len(_absent(queue)) == 4, out
    with Pool(HANDLER, "--queue", queue, "--workers", "1", "--queue-arg", "x-max-length=5",
              tmp_path=tmp_path, env={"RECORD_FILE": str(tmp_path / "r")}) as pool:
        pool.wait_ready(15)
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()


@pytest.mark.timeout(30)
def test_quorum_on_a_classic_queue_says_so_and_leaves_nothing_behind(queue):
    amqp.declare(queue)
    code, out, _ = run_cli(HANDLER, "--queue", queue, "--workers", "2", "--queue-type", "quorum")
    assert code == 4, out
    assert (f"queue '{queue}' is a classic queue; --queue-type quorum needs a new queue (delete "
            "it or use another --queue)") in out, out
    assert len(_absent(queue)) == 4, out
    assert amqp.count(queue) == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("workers", ["1", "4"])
def test_a_refused_start_leaves_no_queue_and_keeps_those_that_existed(queue, workers):
    # A 10 s tier that exists as rmqpool declares it, and a 60 s tier with another TTL.
    # Declared in order, the work queue, the DLQ and the 1 s tier would be created
    # before the 60 s tier is refused; with 4 workers starting at once, one would take
    # another's new queues for old ones and leave them behind.
    ten, sixty = (topology.retry_queue_name(queue, d) for d in (10, 60))
    amqp.declare(ten, arguments={"x-message-ttl": 10000, "x-dead-letter-exchange": "",
                                 "x-dead-letter-routing-key": queue})
    amqp.declare(sixty, arguments={"x-message-ttl": 1000})
    code, out, _ = run_cli(HANDLER, "--queue", queue, "--workers", workers)
    assert code == 4, out
    assert (f"queue '{sixty}' has x-message-ttl=1000, but rmqpool declares it with "
            "x-message-ttl=60000: delete it or use another --queue") in out, out
    assert amqp.count(queue) is None and amqp.count(topology.dlq_name(queue)) is None, out
    assert amqp.count(topology.retry_queue_name(queue, 1)) is None, out
    assert amqp.count(ten) == 0 and amqp.count(sixty) == 0  # they existed before: kept


@pytest.mark.timeout(30)
def test_unreachable_broker_is_retried_with_backoff_until_stopped(queue, tmp_path):
    port = free_port()  # nothing listens there
    with Pool(HANDLER, "--queue", queue, "--workers", "1",
              "--url", f"amqp://guest:guest@127.0.0.1:{port}/", tmp_path=tmp_path,
              env={"RECORD_FILE": str(tmp_path / "r")}) as pool:
        attempt = re.compile(r"cannot reach the broker .*\(attempt (\d+):.*retrying in ([\d.]+)s")

        def attempts() -> list[tuple[int, float]]:
            return [(int(a), float(d)) for a, d in attempt.findall(pool.log())]

        wait_for(lambda: len(attempts()) >= 3, 10, "three connection attempts")
        got = attempts()
        assert [a for a, _ in got] == list(range(1, len(got) + 1)), got
        delays = [d for _, d in got]
        growing = all(b > a for a, b in zip(delays, delays[1:], strict=False))
        assert growing, f"backoff not growing: {delays}"
        assert pool.proc is not None
        assert pool.proc.poll() is None, "the pool gave up"
        status, body = pool.get("/readyz")
        assert status == 503, body
        assert pool.get("/healthz")[0] == 200
        assert len(pool.worker_pids()) == 1
        code, elapsed = pool.stop_with(signal.SIGTERM, 10)
        out = pool.log()
    assert code == 0, out
    assert elapsed < 2, f"SIGTERM took {elapsed:.1f}s while the broker was unreachable"


@pytest.mark.timeout(30)
def test_fatal_topology_error_does_not_claim_to_reconnect(queue, tmp_path):
    amqp.declare(queue, arguments={"x-max-length": 5})
    with Pool(HANDLER, "--queue", queue, "--workers", "1", tmp_path=tmp_path,
              env={"RECORD_FILE": str(tmp_path / "r")}) as pool:
        code = pool.wait(15)
        out = pool.log()
    assert code == 4, out
    assert "reconnecting" not in out, out


@pytest.fixture
def silent_listener():
    """A TCP port that accepts connections and never says a word (a hung broker, a load
    balancer without backends): the AMQP handshake never completes."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(10)
    accepted: list[socket.socket] = []
    yield srv, accepted
    for conn in accepted:
        conn.close()
    srv.close()


@pytest.mark.timeout(40)
def test_sigterm_while_the_broker_handshake_hangs_exits_promptly(queue, tmp_path,
                                                                 silent_listener):
    srv, accepted = silent_listener
    port = srv.getsockname()[1]
    with Pool(HANDLER, "--queue", queue, "--workers", "1",
              "--url", f"amqp://guest:guest@127.0.0.1:{port}/", tmp_path=tmp_path,
              env={"RECORD_FILE": str(tmp_path / "r")}) as pool:
        accepted.append(srv.accept()[0])  # the worker is now waiting for Connection.Start
        assert pool.get("/readyz")[0] == 503
        code, elapsed = pool.stop_with(signal.SIGTERM, 20)
        out = pool.log()
    assert code == 0, out
    assert elapsed < 3, f"SIGTERM took {elapsed:.1f}s while a connection attempt hung\n{out}"


@pytest.mark.timeout(40)
def test_connect_timeout_is_logged_with_a_reason(queue, tmp_path, silent_listener):
    srv, accepted = silent_listener
    port = srv.getsockname()[1]
    with Pool(HANDLER, "--queue", queue, "--workers", "1",
              "--url", f"amqp://guest:guest@127.0.0.1:{port}/", tmp_path=tmp_path,
              env={"RECORD_FILE": str(tmp_path / "r")}) as pool:
        accepted.append(srv.accept()[0])
        wait_for(lambda: "(attempt 1:" in pool.log(), 20, "the first attempt to time out")
        line = next(x for x in pool.log().splitlines() if "(attempt 1:" in x)
    assert re.search(r"\(attempt 1: \w", line), f"no reason given: {line}"
