"""The README stays true: its options, metrics, exit codes and commands are checked,
and its examples run against the real broker."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from rmqpool import exitcodes, topology
from rmqpool.settings import OPTIONS
from tests.support import amqp
from tests.support.pool import ROOT, Pool, free_port, wait_for

README = (ROOT / "README.md").read_text()


def test_every_option_is_documented():
    for opt in OPTIONS:
        assert f"`{opt.flag}" in README, opt.flag
        assert f"`{opt.env}`" in README, opt.env


def test_every_metric_is_documented():
    names = set(re.findall(r'"(rmqpool_[a-z_]+)"', (ROOT / "rmqpool/metrics.py").read_text()))
    assert len(names) >= 11
    for name in names:  # counters are exposed (and documented) with their _total suffix
        assert f"`{name}`" in README or f"`{name}_total`" in README, name


def test_exit_codes_are_documented():
    table = dict(re.findall(r"^\| (\d+) \| (.+) \|$", README, re.M))
    assert set(map(int, table)) == set(exitcodes.DESCRIPTIONS)


def test_first_screen_commands_and_ci_agree():
    first_screen = README.split("\n## ")[0]
    assert "bash examples/demo.sh" in first_screen and "bash .ci/run" in first_screen
    m = re.search(r"then runs: (.+?)\)", first_screen, re.S)
    assert m is not None
    test_command = m.group(1).strip()
    assert test_command in (ROOT / ".ci/run").read_text()


@pytest.mark.timeout(120)
def test_demo_command_runs_the_pool_and_drains_on_ctrl_c(tmp_path):
    queue = amqp.unique("demo")
    log_path = tmp_path / "demo.log"
    env = {**os.environ, "RMQPOOL_QUEUE": queue, "RMQPOOL_METRICS_PORT": str(free_port())}
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(["bash", "examples/demo.sh"], cwd=ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            # 20 messages, every 7th fails: 17 handled, 3 dead-lettered after 2 retries.
            wait_for(lambda: log_path.read_text().count("handled ") >= 17, 90, "17 handled")
            wait_for(lambda: amqp.count(topology.dlq_name(queue)) == 3, 30, "3 dead letters")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert "published 20 message(s)" in log_path.read_text()
    finally:
        amqp.delete(amqp.pool_queues(queue, (1.0, 2.0)))


@pytest.mark.timeout(60)
def test_readme_handler_example_runs(queue, tmp_path):
    m = re.search(r"```python\n(# handlers.py.*?)```", README, re.S)
    assert m is not None
    code = m.group(1)
    (tmp_path / "readme_handlers.py").write_text(code)
    with Pool("readme_handlers:handle", "--queue", queue, "--workers", "1", tmp_path=tmp_path,
              env={"PYTHONPATH": f"{ROOT}:{tmp_path}"}) as pool:
        pool.wait_ready()
        plain, later = amqp.publish(queue, [{"text": "a"}, {"later": True, "text": "b"}])
        [unknown] = amqp.publish(queue, [{"kind": "unknown"}])
        wait_for(lambda: f"{plain} 1 " in pool.log() and f"{later} 2 " in pool.log(), 20,
                 "both handled, the second on attempt 2")
        wait_for(lambda: amqp.count(topology.dlq_name(queue)) == 1, 10, "the rejected one")
        pool.signal(signal.SIGTERM)
        assert pool.wait(10) == 0
    [dead] = amqp.get_all(topology.dlq_name(queue))
    assert dead.message_id == unknown and dead.headers["x-rmqpool-reason"] == "rejected"
    amqp.delete([topology.retry_queue_name(queue, 2)])


@pytest.mark.timeout(90)
def test_readme_client_example_runs(queue, tmp_path):
    code = re.search(r"```python\n(# client.py.*?)```", README, re.S)
    assert code is not None
    script = tmp_path / "readme_client.py"
    script.write_text(code.group(1).replace('"jobs"', repr(queue)))
    with Pool("tests.support.handlers:echo", "--queue", queue, "--workers", "1",
              tmp_path=tmp_path, env={"RECORD_FILE": str(tmp_path / "records")}) as pool:
        pool.wait_ready()
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, out.stderr
        job_id, count, reply = out.stdout.strip().split(" ", 2)
        assert len(job_id) == 32 and count == "1000"
        assert "'echo': {'text': 'hi'}" in reply
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0


@pytest.mark.timeout(60)
def test_readme_handler_output_example_runs(queue, tmp_path):
    code = re.search(r"```python\n(def handle\(body, message: rmqpool.Message\):\n"
                     r"    message.publish.*?)```", README, re.S)
    assert code is not None
    out_queue = f"{queue}-thumbnails"
    amqp.declare(out_queue)
    (tmp_path / "readme_output.py").write_text(
        "import rmqpool\n\n" + code.group(1).replace('"thumbnails"', repr(out_queue)))
    try:
        with Pool("readme_output:handle", "--queue", queue, "--workers", "1",
                  tmp_path=tmp_path, env={"PYTHONPATH": f"{ROOT}:{tmp_path}"}) as pool:
            pool.wait_ready()
            amqp.publish(queue, [{"id": 7}])
            wait_for(lambda: amqp.count(out_queue) == 1, 15, "the output message")
            pool.signal(signal.SIGTERM)
            assert pool.wait(15) == 0
        [output] = amqp.get_all(out_queue)
        assert json.loads(output.body) == {"thumbnail_of": 7}
    finally:
        amqp.delete([out_queue])
