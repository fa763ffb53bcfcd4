"""examples/fastapi_app.py through FastAPI's TestClient (lifespan included), against the
real broker, with a real pool (tests.support.handlers:echo) answering its calls."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from examples.fastapi_app import Config, create_app
from tests.support import amqp
from tests.support.pool import ROOT, Pool, free_port, wait_for
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def rpc_queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A queue that a pool with one worker consumes, failed messages dead-lettered at once."""
    queue = amqp.unique("fastapi-rpc")
    tmp = tmp_path_factory.mktemp("fastapi-pool")
    pool = Pool("tests.support.handlers:echo", "--queue", queue, "--workers", "1",
                "--max-retries", "0", tmp_path=tmp, env={"RECORD_FILE": str(tmp / "records")})
    try:
        with pool:
            pool.wait_ready()
            yield queue
    finally:
        amqp.delete(amqp.pool_queues(queue))


@pytest.fixture
def jobs_queue() -> Iterator[str]:
    queue = amqp.unique("fastapi-jobs")
    amqp.declare(queue)
    yield queue
    amqp.delete([queue])


def client(**env: str) -> TestClient:
    config = Config.from_env({"RMQPOOL_URL": amqp.URL, **env})
    return TestClient(create_app(config), raise_server_exceptions=True)


def test_a_job_is_published_persistent_and_answered_202_with_its_id(jobs_queue):
    with client(APP_JOBS_QUEUE=jobs_queue) as app:
        answer = app.post("/jobs", json={"n": 1, "text": "é"})
    assert answer.status_code == 202, answer.text
    [message] = amqp.get_all(jobs_queue)
    assert answer.json() == {"message_id": message.message_id}
    assert json.loads(message.body) == {"n": 1, "text": "é"}
    assert message.content_type == "application/json"
    assert message.delivery_mode == 2  # persistent


def test_a_job_no_queue_takes_is_503_with_the_reason():
    with client(APP_JOBS_QUEUE=amqp.unique("missing")) as app:
        answer = app.post("/jobs", json={"n": 1})
    assert answer.status_code == 503
    assert "no queue is bound to routing key" in answer.json()["detail"]


@pytest.mark.parametrize(("body", "content_type"), [
    (b"not json", "application/json"), (b"[1, 2]", "application/json"),
    (b'"a string"', "application/json"), (b'{"n": 1}', "text/plain")])
def test_a_body_that_is_not_a_json_object_is_422_and_nothing_is_published(jobs_queue, body,
                                                                           content_type):
    with client(APP_JOBS_QUEUE=jobs_queue) as app:
        answer = app.post("/jobs", content=body, headers={"content-type": content_type})
    assert answer.status_code == 422, answer.text
    assert amqp.count(jobs_queue) == 0


def test_rpc_answers_the_pools_reply(rpc_queue):
    with client(APP_RPC_QUEUE=rpc_queue) as app:
        answers = [app.post("/rpc", json={"n": n}) for n in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json() for a in answers] == [{"echo": {"n": n}, "attempt": 1} for n in range(3)]


def test_an_rpc_the_pool_dead_letters_is_502_with_reason_type_and_message(rpc_queue):
    with client(APP_RPC_QUEUE=rpc_queue) as app:
        answer = app.post("/rpc", json={"fail": "x"})
        after = app.post("/rpc", json={"n": 2})
    assert answer.status_code == 502, answer.text
    assert answer.json() == {"detail": {"reason": "max_retries", "type": "ValueError",
                                        "message": "x"}}
    assert after.json() == {"echo": {"n": 2}, "attempt": 1}  # the app is fine after it


def test_an_rpc_nobody_answers_is_504(jobs_queue):
    with client(APP_RPC_QUEUE=jobs_queue, APP_RPC_TIMEOUT="0.3") as app:
        answer = app.post("/rpc", json={"n": 1})
    assert answer.status_code == 504
    assert "no reply to" in answer.json()["detail"]


def test_healthz_says_connected():
    with client() as app:  # the lifespan waits for the first connection
        answer = app.get("/healthz")
    assert (answer.status_code, answer.json()) == (200, {"connected": True})


def test_with_the_broker_unreachable_the_app_starts_and_says_not_connected():
    started = time.monotonic()
    url = f"amqp://guest:secret@127.0.0.1:{free_port()}/"  # nothing listens there
    with client(RMQPOOL_URL=url, APP_BROKER_WAIT="0.5") as app:
        assert time.monotonic() - started < 5
        health = app.get("/healthz")
        job = app.post("/jobs", json={"n": 1})
    assert (health.status_code, health.json()) == (503, {"connected": False})
    assert job.status_code == 503
    assert "not connected to the broker" in job.json()["detail"]
    assert "secret" not in job.text


def test_a_malformed_url_stops_the_start_up():
    with pytest.raises(ValueError), client(RMQPOOL_URL="amqp://guest:guest@127.0.0.1:x/"):
        pass


def test_the_app_connects_once_the_broker_is_reachable_and_reconnects(jobs_queue):
    broker = urlsplit(amqp.URL)
    with TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672) as proxy:
        proxy.pause()  # connections are reset, as by a broker that is down
        url = f"{proxy.url()}?reconnect_interval=0.2"  # aio-pika's robust connection
        with client(RMQPOOL_URL=url, APP_BROKER_WAIT="3", APP_JOBS_QUEUE=jobs_queue) as app:
            assert app.get("/healthz").status_code == 503
            proxy.resume()
            wait_for(lambda: app.get("/healthz").status_code == 200, 10, "connected")
            assert app.post("/jobs", json={"n": 1}).status_code == 202
            proxy.cut()  # the robust connection comes back by itself
            assert app.post("/jobs", json={"n": 2}).status_code == 202
            wait_for(lambda: app.get("/healthz").status_code == 200, 10, "reconnected")
    assert sorted(json.loads(m.body)["n"] for m in amqp.get_all(jobs_queue)) == [1, 2]


def test_the_readme_commands_serve_the_example(tmp_path):
    """The README's uvicorn command serves the app; its RPC pool command answers /rpc."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"### FastAPI\n.*?```sh\n(.*?)```", readme, re.S)
    assert match is not None
    commands = [shlex.split(line, comments=True) for line in match.group(1).splitlines()]
    [pool_argv] = [c for c in commands if c[:1] == ["rmqpool"] and "examples.handlers:echo" in c]
    [uvicorn_argv] = [c for c in commands if c[:1] == ["uvicorn"]]
    rpc_queue, port = amqp.unique("fastapi-readme"), free_port()
    pool_args = _replace(pool_argv[1:], "--queue", rpc_queue)
    app_args = _replace(uvicorn_argv[1:], "--port", str(port))
    env = {**os.environ, "RMQPOOL_URL": amqp.URL, "APP_RPC_QUEUE": rpc_queue}
    try:
        with Pool(*[a for a in pool_args if a != "&"], "--max-retries", "0", tmp_path=tmp_path):
            with subprocess.Popen([sys.executable, "-m", "uvicorn", *app_args], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  start_new_session=True) as server:
                try:
                    wait_for(lambda: _http(port, "GET", "/healthz")[0] == 200, 30, "/healthz")
                    assert _http(port, "POST", "/rpc", {"n": 1}) == (
                        200, {"echo": {"n": 1}, "attempt": 1})
                    assert _http(port, "POST", "/rpc", {"fail": "x"}) == (502, {"detail": {
                        "reason": "max_retries", "type": "ValueError",
                        "message": "asked to fail: x"}})
                finally:
                    server.send_signal(signal.SIGINT)
                    output = server.communicate(timeout=15)[0].decode()
                assert server.returncode == 0, output
                assert "Application shutdown complete" in output, output
    finally:
        amqp.delete(amqp.pool_queues(rpc_queue))


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with the value after `flag` replaced."""
    at = argv.index(flag) + 1
    return [*argv[:at], value, *argv[at + 1:]]


def _http(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     method=method,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except (urllib.error.URLError, ConnectionError):
        return 0, None
