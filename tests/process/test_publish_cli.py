"""`rmqpool publish` and `rmqpool call`, the real CLI as a subprocess against the real
broker (and, for call, a real pool): what arrives, how fast, what is printed, and every
documented exit code."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest

from rmqpool import exitcodes, topology
from tests.support import amqp
from tests.support.pool import ROOT, Pool, free_port, wait_for

SUMMARY = re.compile(r"^published (\d+) message\(s\) to (.+) in [\d.]+ s \(([\d.e+]+) msg/s\)$")


def cli(*args: str, input: str | None = None, env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run `rmqpool ARGS` to completion; stdin is `input` (or nothing)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "RMQPOOL_URL": amqp.URL, **(env or {})}
    return subprocess.run([sys.executable, "-m", "rmqpool", *args], cwd=ROOT, env=full_env,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def popen(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RMQPOOL_URL": amqp.URL}
    return subprocess.Popen([sys.executable, "-m", "rmqpool", *args], cwd=ROOT, env=env,
                            text=True, **kwargs)


def one_error(result: subprocess.CompletedProcess[str], code: int, command: str,
              *needles: str) -> str:
    """The run failed with `code` and one line on stderr naming `needles`."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"rmqpool {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def declared(queue: str) -> str:
    amqp.declare(queue)
    return queue


def bind(queue: str, exchange: str, key: str) -> None:
    async def go() -> None:
        async with await aio_pika.connect(amqp.URL) as connection:
            channel = await connection.channel()
            ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC,
                                                auto_delete=True)
            q = await channel.declare_queue(queue, durable=True)
            await q.bind(ex, key)

    asyncio.run(go())


def bodies(queue: str) -> list[Any]:
    return [json.loads(m.body) for m in amqp.get_all(queue)]


# -- what arrives ---------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_body_with_count_arrives_as_json_with_a_summary_on_stderr(declared):
    result = cli("publish", "--routing-key", declared, "--body", '{"n": 1}', "--count", "50")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    m = SUMMARY.match(result.stderr.strip())
    assert m is not None, result.stderr
    assert m.group(1) == "50" and m.group(2) == f"(default)/{declared}"
    messages = amqp.get_all(declared)
    assert [json.loads(msg.body) for msg in messages] == [{"n": 1}] * 50
    assert {msg.content_type for msg in messages} == {"application/json"}
    assert {msg.delivery_mode for msg in messages} == {aio_pika.DeliveryMode.PERSISTENT}
    assert len({msg.message_id for msg in messages}) == 50  # each its own id


@pytest.mark.timeout(60)
def test_json_lines_from_a_file_in_order_blank_lines_skipped(declared, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"n": 1}\n\n"two"\r\n[3]\n4')  # CRLF and no final newline are fine
    result = cli("publish", "--routing-key", declared, "--file", str(path))
    assert result.returncode == 0, result.stderr
    m = SUMMARY.match(result.stderr.strip())
    assert m is not None and m.group(1) == "4", result.stderr
    assert bodies(declared) == [{"n": 1}, "two", [3], 4]


@pytest.mark.timeout(60)
def test_json_lines_from_stdin(declared):
    lines = "".join(json.dumps({"i": i}) + "\n" for i in range(300))
    result = cli("publish", "--routing-key", declared, input=lines)
    assert result.returncode == 0, result.stderr
    assert bodies(declared) == [{"i": i} for i in range(300)]


@pytest.mark.timeout(60)
def test_raw_sends_the_text_as_bytes_without_a_content_type(declared):
    assert cli("publish", "--routing-key", declared, "--raw", "--body", "not {json").returncode == 0
    assert cli("publish", "--routing-key", declared, "--raw", input="a b\n{c\n").returncode == 0
    messages = amqp.get_all(declared)
    assert [m.body for m in messages] == [b"not {json", b"a b", b"{c"]
    assert {m.content_type for m in messages} == {None}


@pytest.mark.timeout(60)
def test_headers_arrive_typed_and_ids_are_set(declared):
    result = cli("publish", "--routing-key", declared, "--body", "{}",
                 "--header", "n=42", "--header", "neg=-7", "--header", "on=true",
                 "--header", "off=false", "--header", "text=hello world",
                 "--header", "forced=str:123", "--header", "empty=",
                 "--message-id", "m-1", "--correlation-id", "c-1")
    assert result.returncode == 0, result.stderr
    [message] = amqp.get_all(declared)
    assert message.headers == {"n": 42, "neg": -7, "on": True, "off": False,
                               "text": "hello world", "forced": "123", "empty": ""}
    assert message.message_id == "m-1" and message.correlation_id == "c-1"


@pytest.mark.timeout(60)
def test_exchange_and_routing_key(queue):
    exchange = amqp.unique("ex")
    bind(queue, exchange, "jobs.*")
    try:
        result = cli("publish", "--exchange", exchange, "--routing-key", "jobs.resize",
                     "--body", '"x"', "--count", "3")
        assert result.returncode == 0, result.stderr
        assert f"to {exchange}/jobs.resize in" in result.stderr
        messages = amqp.get_all(queue)
        assert [(m.exchange, m.routing_key, m.body) for m in messages] == [
            (exchange, "jobs.resize", b'"x"')] * 3
    finally:
        amqp.delete([], exchanges=[exchange])


@pytest.mark.timeout(60)
def test_rate_paces_what_the_broker_receives(declared):
    """30 messages at 20/s: the broker sees them arrive over more than a second (a
    burst of at most 2, then one every 50 ms), not all at once."""
    proc = popen("publish", "--routing-key", declared, "--body", "1", "--count", "30",
                 "--rate", "20", "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: list[tuple[float, int]] = []

    def arrived_all() -> bool:
        seen.append((time.monotonic(), amqp.count(declared) or 0))
        return seen[-1][1] == 30

    try:
        wait_for(arrived_all, 20, "30 messages")
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    first = next(t for t, n in seen if n >= 3)
    last = next(t for t, n in seen if n == 30)
    assert last - first >= 0.8, seen  # 27 more at 20/s take 1.35 s (polls may lag)
    assert len({n for _, n in seen if 0 < n < 30}) >= 3, seen  # counts on the way
    summary = json.loads(out)
    assert summary["published"] == 30 and summary["seconds"] >= 1.3
    assert summary["rate"] <= 22, summary


@pytest.mark.timeout(60)
def test_json_summary_parses(declared):
    result = cli("publish", "--routing-key", declared, "--body", "1", "--count", "5", "--json")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    summary = json.loads(result.stdout)
    assert summary["published"] == 5 and summary["exchange"] == ""
    assert summary["routing_key"] == declared and summary["rate"] > 0
    assert set(summary) == {"published", "exchange", "routing_key", "seconds", "rate"}


# -- the progress bar -----------------------------------------------------------------------
def _run_on_a_terminal(*args: str) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal (80 columns); (exit code, what it showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = popen(*args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    shown = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            shown += data
        return proc.wait(10), shown.decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(60)
def test_a_progress_bar_on_a_terminal_and_none_without(declared):
    code, shown = _run_on_a_terminal("publish", "--routing-key", declared, "--body", "1",
                                     "--count", "200")
    assert code == 0, shown
    assert "\r" in shown and "100%" in shown and "200/200" in shown, shown
    assert SUMMARY.match(shown.strip().splitlines()[-1].split("\r")[-1]), shown
    piped = cli("publish", "--routing-key", declared, "--body", "1", "--count", "200")
    assert piped.returncode == 0
    assert "%" not in piped.stderr and "\r" not in piped.stderr
    assert SUMMARY.match(piped.stderr.strip()) and len(piped.stderr.splitlines()) == 1
    assert amqp.count(declared) == 400


# -- exit codes -----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_unroutable_routing_key(queue):
    result = cli("publish", "--routing-key", queue, "--body", "1", "--count", "3")
    one_error(result, exitcodes.UNROUTABLE, "publish", f"routing key {queue!r}",
              "the default exchange", "--routing-key", "bind")
    assert amqp.count(queue) is None  # nothing created on the way


@pytest.mark.timeout(60)
def test_missing_exchange(queue):
    exchange = amqp.unique("missing")
    for count in ("1", "2000"):  # many in flight: none waits for the channel to reopen
        result = cli("publish", "--exchange", exchange, "--routing-key", queue, "--body", "1",
                     "--count", count, timeout=20)
        one_error(result, exitcodes.PUBLISH_FAILED, "publish", f"exchange {exchange!r}",
                  "does not exist", "declare it")


@pytest.mark.timeout(60)
def test_refused_credentials_and_the_password_never_shown(declared):
    url = "amqp://guest:hunter2-secret@127.0.0.1:5672/"
    for args in (["--url", url], []):
        env = {} if args else {"RMQPOOL_URL": url}
        result = cli("publish", *args, "--routing-key", declared, "--body", "1", "--json",
                     env=env)
        line = one_error(result, exitcodes.BROKER_REFUSED, "publish", "refused the credentials",
                         "guest:***@127.0.0.1", "fix the user or password")
        assert "hunter2" not in result.stdout + result.stderr, line
        assert "refused the credentials" in json.loads(result.stdout)["error"]
        called = cli("call", *args, "--routing-key", declared, "--body", "1", env=env)
        one_error(called, exitcodes.BROKER_REFUSED, "call", "guest:***@")
        assert "hunter2" not in called.stdout + called.stderr
    assert amqp.count(declared) == 0


@pytest.mark.timeout(60)
def test_refused_virtual_host():
    vhost = amqp.unique("vhost")
    result = cli("publish", "--url", f"{amqp.URL}{vhost}", "--routing-key", "q", "--body", "1")
    one_error(result, exitcodes.BROKER_REFUSED, "publish", "refused to open the virtual host",
              vhost, "set_permissions")


@pytest.mark.timeout(60)
def test_no_broker_listening():
    url = f"amqp://guest:hunter2-secret@127.0.0.1:{free_port()}/"
    result = cli("publish", "--url", url, "--routing-key", "q", "--body", "1")
    one_error(result, exitcodes.PUBLISH_FAILED, "publish", "cannot reach the broker",
              "is it running")
    assert "hunter2" not in result.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("body, needles", [
    ("{", ["--body is not valid JSON", "column 2", "--raw"]),
    ("hello", ["--body is not valid JSON", "Expecting value", "'\"text\"'"]),
    ("NaN", ["--body is not valid JSON", "NaN is not JSON"]),
    ("[1] [2]", ["--body is not valid JSON", "Extra data"]),
], ids=["unclosed", "bare-text", "nan", "two-values"])
def test_bad_json_body(declared, body, needles):
    result = cli("publish", "--routing-key", declared, "--body", body)
    one_error(result, exitcodes.USAGE, "publish", *needles)
    assert amqp.count(declared) == 0


@pytest.mark.timeout(60)
def test_a_bad_line_in_a_file_sends_nothing(declared, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"n": 1}\n{"n": 2}\n\n{"n": 3\n{"n": 4}\n')
    result = cli("publish", "--routing-key", declared, "--file", str(path), "--json")
    one_error(result, exitcodes.USAGE, "publish", f"{path} line 4 is not valid JSON",
              "nothing was sent", "one JSON value per line")
    assert json.loads(result.stdout)["published"] == 0
    assert amqp.count(declared) == 0


@pytest.mark.timeout(60)
def test_a_bad_line_on_stdin_stops_there(declared):
    lines = "".join(f'{{"n": {i}}}\n' for i in range(10)) + "oops\n" + '{"n": 99}\n'
    result = cli("publish", "--routing-key", declared, input=lines)
    one_error(result, exitcodes.USAGE, "publish", "stdin line 11 is not valid JSON",
              "nothing from it on was sent", "(10 message(s) were confirmed)")
    assert bodies(declared) == [{"n": i} for i in range(10)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, needles", [
    (["--routing-key", "q", "--body", "1", "--count", "0"], ["--count", "'0'", "above 0"]),
    (["--routing-key", "q", "--body", "1", "--rate", "fast"], ["--rate", "'fast'"]),
    (["--routing-key", "q", "--body", "1", "--header", "nokey"], ["--header", "KEY=VALUE"]),
    (["--routing-key", "q", "--body", "1", "--header", "n=99999999999999999999"],
     ["64 bits", "n=str:99999999999999999999"]),
    (["--routing-key", "q", "--body", "1", "--header", "a=1", "--header", "a=2"],
     ["--header a is given 2 times"]),
    (["--routing-key", "q", "--body", "1", "--file", "f"], ["--body or --file"]),
    (["--routing-key", "q", "--count", "2"], ["--count repeats --body"]),
    (["--routing-key", "q", "--body", "1", "--count", "2", "--message-id", "m"],
     ["--message-id names one message"]),
    (["--routing-key", "q", "--file", "/nonexistent/x.jsonl"], ["cannot read --file", "path"]),
    (["--routing-key", "q", "--body", "1", "--url", "http://h/"], ["--url", "amqp://"]),
    (["--body", "1"], ["no --routing-key"]),
    (["--routng-key", "q"], ["unknown option --routng-key", "did you mean --routing-key?"]),
    (["--rout", "q"], ["unknown option --rout"]),  # no abbreviations
    (["--routing-key", "q", "extra"], ["unexpected argument 'extra'"]),
], ids=["count-0", "rate-text", "header-no-eq", "header-64bit", "header-twice", "body-and-file",
        "count-alone", "id-of-many", "no-file", "url-scheme", "no-key", "typo", "abbrev",
        "positional"])
def test_bad_options_are_one_line_and_exit_2(args, needles):
    one_error(cli("publish", *args), exitcodes.USAGE, "publish", *needles)


@pytest.mark.timeout(60)
def test_json_output_of_a_failure_and_of_an_empty_stdin(declared):
    failed = cli("publish", "--routing-key", amqp.unique("none"), "--body", "1", "--json")
    assert failed.returncode == exitcodes.UNROUTABLE
    assert json.loads(failed.stdout)["published"] == 0
    assert "no queue is bound" in json.loads(failed.stdout)["error"]
    empty = cli("publish", "--routing-key", declared, "--json", input="")
    assert empty.returncode == 0 and json.loads(empty.stdout)["published"] == 0


@pytest.mark.timeout(60)
def test_interrupted_publish_says_how_many_were_confirmed(declared):
    for sig in (signal.SIGINT, signal.SIGTERM):
        amqp.get_all(declared)
        proc = popen("publish", "--routing-key", declared, "--body", "1", "--count", "1000",
                     "--rate", "20", "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: (amqp.count(declared) or 0) >= 5, 20, "some messages")
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=15)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == exitcodes.INTERRUPTED, err
        summary = json.loads(out)
        assert summary["error"].startswith("interrupted")
        assert 5 <= summary["published"] < 1000
        assert f"({summary['published']} message(s) were confirmed)" in err
        assert amqp.count(declared) == summary["published"]  # exact: in flight settled


# -- help -----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_help_of_each_command():
    top = cli("--help")
    assert top.returncode == 0 and "rmqpool publish" in top.stdout and "rmqpool call" in top.stdout
    for command, codes in (("publish", exitcodes.PUBLISH), ("call", exitcodes.CALL)):
        result = cli(command, "--help")
        assert result.returncode == 0 and result.stderr == ""
        assert result.stdout.startswith(f"usage: rmqpool {command} ")
        for flag in ("--url", "--exchange", "--routing-key", "--header", "--body", "--json"):
            assert flag in result.stdout, (command, flag)
        for code in codes:
            assert re.search(rf"^  {code} +\S", result.stdout, re.M), (command, code)
    publish = cli("publish", "--help").stdout
    assert "--rate" in publish and "--count" in publish and "streamed" in publish
    assert "--timeout" in cli("call", "--help").stdout


# -- call -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def echo_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A pool running tests.support.handlers:echo, no retries; yields its queue."""
    tmp_path = tmp_path_factory.mktemp("echo")
    queue = amqp.unique("echo")
    pool = Pool("tests.support.handlers:echo", "--queue", queue, "--workers", "1",
                "--max-retries", "0", tmp_path=tmp_path, metrics=True,
                env={"RECORD_FILE": str(tmp_path / "records.txt")})
    try:
        pool.start()
        pool.wait_ready()
        yield queue
    finally:
        pool.close()
        amqp.delete(amqp.pool_queues(queue))


@pytest.mark.timeout(90)
def test_call_prints_the_reply(echo_pool):
    result = cli("call", "--routing-key", echo_pool, "--body", '{"a": [1, "b"]}')
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout) == {"echo": {"a": [1, "b"]}, "attempt": 1}
    assert len(result.stdout.splitlines()) > 1  # pretty-printed for people
    as_json = cli("call", "--routing-key", echo_pool, "--body", '"hi"', "--json",
                  "--header", "n=1")
    assert as_json.returncode == 0, as_json.stderr
    assert as_json.stdout.count("\n") == 1  # one line for scripts
    assert json.loads(as_json.stdout) == {"echo": "hi", "attempt": 1}


@pytest.mark.timeout(90)
def test_call_remote_error(echo_pool):
    result = cli("call", "--routing-key", echo_pool, "--body", '{"fail": "x"}')
    one_error(result, exitcodes.REMOTE_ERROR, "call", "dead-lettered the request",
              "max_retries: ValueError: x", "dead-letter queue")
    assert result.stdout == ""
    as_json = cli("call", "--routing-key", echo_pool, "--body", '{"fail": "y"}', "--json")
    assert as_json.returncode == exitcodes.REMOTE_ERROR
    assert json.loads(as_json.stdout) == {"reason": "max_retries", "type": "ValueError",
                                          "message": "y"}
    wait_for(lambda: amqp.count(topology.dlq_name(echo_pool)) == 2, 10, "both dead letters")


@pytest.mark.timeout(60)
def test_call_timeout_against_a_queue_nobody_consumes(declared):
    t0 = time.monotonic()
    result = cli("call", "--routing-key", declared, "--body", "1", "--timeout", "500ms")
    one_error(result, exitcodes.CALL_TIMEOUT, "call", "no reply", "within 0.5s", "--timeout")
    assert time.monotonic() - t0 >= 0.5
    assert amqp.count(declared) == 1  # the request waits there for a consumer


@pytest.mark.timeout(60)
def test_call_bad_input_and_unroutable(queue):
    one_error(cli("call", "--routing-key", queue, "--body", "{"), exitcodes.USAGE, "call",
              "--body is not valid JSON")
    one_error(cli("call", "--routing-key", queue), exitcodes.USAGE, "call", "--body")
    one_error(cli("call", "--routing-key", queue, "--body", "1", "--timeout", "soon"),
              exitcodes.USAGE, "call", "--timeout", "'soon'", "e.g. 30s")
    one_error(cli("call", "--routing-key", queue, "--body", "1"), exitcodes.UNROUTABLE, "call",
              f"routing key {queue!r}")


# -- the README's examples ------------------------------------------------------------------
def readme_examples() -> list[str]:
    section = (ROOT / "README.md").read_text().split("### Command line: publish and call")[1]
    m = re.search(r"```sh\n(.*?)```", section, re.S)
    assert m is not None
    return [line for line in m.group(1).splitlines() if line and not line.startswith("#")]


@pytest.mark.timeout(90)
def test_readme_examples_run(echo_pool, tmp_path):
    """Each README example, with `jobs` the echo pool's queue and `events` an exchange
    bound to it; `tail -f` (a stream that never ends) reads its file and ends."""
    exchange = amqp.unique("events")
    bind(echo_pool, exchange, "jobs.created")
    (tmp_path / "jobs.jsonl").write_text('{"n": 1}\n{"n": 2}\n')
    (tmp_path / "events.jsonl").write_text('{"created": 1}\n')
    prelude = f'rmqpool() {{ "{sys.executable}" -m rmqpool "$@"; }}; tail() {{ cat "${{@: -1}}"; }}'
    examples = readme_examples()
    assert len(examples) == 5 and any("|" in line for line in examples)
    try:
        for line in examples:
            command = re.sub(r"\bjobs\b(?!\.)", echo_pool, line).replace(
                "--exchange events", f"--exchange {exchange}")
            result = subprocess.run(["bash", "-c", f"{prelude}; {command}"], cwd=tmp_path,
                                    env={**os.environ, "PYTHONPATH": str(ROOT),
                                         "RMQPOOL_URL": amqp.URL},
                                    stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                    timeout=30)
            assert result.returncode == 0, (line, result.stderr)
            if " call " in line:
                assert json.loads(result.stdout) == {"echo": {"text": "hi"}, "attempt": 1}
    finally:
        amqp.delete([], exchanges=[exchange])
