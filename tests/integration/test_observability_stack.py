"""The observability stack end to end: a real pool under load, scraped by a real
Prometheus that loads deploy/prometheus/rmqpool-alerts.yml; every PromQL expression of
grafana/dashboards/rmqpool.json and of the alert rules is evaluated against it.

Needs the `prometheus` and `promtool` binaries (Debian: apt-get install prometheus; CI:
.ci/ensure-prometheus); skipped without them.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support import amqp
from tests.support.pool import ROOT, Pool, free_port, terminate, wait_for

DASHBOARD = ROOT / "grafana" / "dashboards" / "rmqpool.json"
RULES = ROOT / "deploy" / "prometheus" / "rmqpool-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "rmqpool-alerts.test.yml"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
RETRY_DELAY = 0.2
# What Grafana would put in for its built-in variables with a 1s scrape interval.
BUILTINS = {"__rate_interval": "10s", "__interval": "5s", "__range": "5m",
            "__interval_ms": "5000", "__range_s": "300", "__range_ms": "300000"}

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed "
                                    "(apt-get install prometheus, or .ci/ensure-prometheus)")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus/promtool are not installed (apt-get install prometheus, "
           "or .ci/ensure-prometheus)")


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def query_panels() -> list[dict[str, Any]]:
    return [p for p in all_panels(load_dashboard()["panels"]) if p.get("targets")]


def grafana_regex_escape(value: str) -> str:
    """How Grafana formats a multi-value/All Prometheus variable value for =~."""
    value = value.replace("\\", "\\\\\\\\")
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0), value)


def interpolate(expr: str, variables: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in variables:
            raise AssertionError(f"unknown dashboard variable ${name} in {expr!r}")
        return variables[name]

    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", sub, expr)
    assert "$" not in out, out
    return out


# -- static checks: no Prometheus needed -------------------------------------------------------

def test_dashboard_is_importable() -> None:
    d = load_dashboard()
    assert d["uid"] == "rmqpool" and d["title"] and d.get("id") is None
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert "__inputs" not in d, "the datasource variable makes __inputs unnecessary"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["queue"]["query"]["query"] == \
        "label_values(rmqpool_messages_processed_total, queue)"
    ids = [p["id"] for p in all_panels(d["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels(d["panels"]):
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, \
            panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert t["expr"] and t["refId"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    # No hard-coded data source uid anywhere.
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', DASHBOARD.read_text()))
    assert uids <= {"rmqpool", "${datasource}", "-- Grafana --"}, uids


@needs_promtool
@pytest.mark.timeout(60)
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    assert PROMTOOL is not None
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout
    tested = subprocess.run([PROMTOOL, "test", "rules", str(RULE_TESTS)], capture_output=True,
                            text=True, timeout=30, cwd=RULE_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


# -- a real pool, a real Prometheus --------------------------------------------------------------

class Prometheus:
    def __init__(self, tmp: pathlib.Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tmp
        config = {  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "rmqpool",
                                "static_configs": [{"targets": [target]}]}],
        }
        self.config = tmp / "prometheus.yml"
        self.config.write_text(json.dumps(config, indent=2))
        self.log_path = tmp / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert PROMETHEUS is not None
        self._log = open(self.log_path, "wb")
        self.proc = proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config}",
             f"--storage.tsdb.path={self.tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h"],
            cwd=self.tmp, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: self._ready() or proc.poll() is not None, 30,
                 "Prometheus to be ready", interval=0.1)
        assert proc.poll() is None, self.log()

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                answer: dict[str, Any] = json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400/422 carry the PromQL error as JSON
            answer = json.loads(e.read())
            e.close()
        return answer

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def values(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """The samples of an instant query; raises if it does not succeed."""
        answer = self.query(expr)
        assert answer["status"] == "success", (expr, answer)
        data = answer["data"]
        if data["resultType"] in ("scalar", "string"):
            return [({}, float(data["result"][1]))]
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
        if hasattr(self, "_log"):
            self._log.close()


class Load(threading.Thread):
    """Publishes a mix of messages until stopped, so every rate has data when it is queried."""

    BATCH = [*({"n": i} for i in range(6)), {"sleep": 0.05}, {"sleep": 0.02},
             {"fail": "x"}, {"reject": "why"}]

    def __init__(self, queue: str) -> None:
        super().__init__(daemon=True, name="load")
        self.queue = queue
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.batches = 0

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                amqp.publish(self.queue, self.BATCH)
                self.batches += 1
                self.stopping.wait(0.3)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)
        assert not self.is_alive(), "the load thread did not stop"
        if self.error is not None:
            raise self.error


@dataclass
class Stack:
    pool: Pool
    prometheus: Prometheus
    queue: str
    instance: str
    served: set[str]

    def variables(self) -> dict[str, str]:
        return {**BUILTINS, "queue": grafana_regex_escape(self.queue),
                "instance": grafana_regex_escape(self.instance)}


def served_families(pool: Pool) -> set[str]:
    return {re.sub(r"_(total|bucket|sum|count)$", "", name) for name, _ in pool.metrics()}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if PROMETHEUS is None or PROMTOOL is None:
        pytest.skip("prometheus/promtool are not installed")
    tmp = tmp_path_factory.mktemp("observability")
    queue = amqp.unique("obs")
    pool = Pool("tests.support.handlers:behave", "--queue", queue, "--workers", "2",
                "--max-retries", "1", "--retry-delays", str(RETRY_DELAY), tmp_path=tmp,
                env={"RECORD_FILE": str(tmp / "records.txt")})
    instance = f"127.0.0.1:{pool.port}"
    prometheus = Prometheus(tmp, instance)
    load = Load(queue)
    try:
        pool.start()
        pool.wait_ready(30)
        prometheus.start()
        load.start()

        def counted(name: str, **labels: str) -> float:
            return pool.metric(name, queue=queue, **labels)

        wait_for(lambda: all(counted("rmqpool_messages_processed_total", outcome=o) > 0
                             for o in ("acked", "retried", "dead_lettered"))
                 and counted("rmqpool_dead_letters_total", reason="rejected") > 0
                 and counted("rmqpool_dead_letters_total", reason="max_retries") > 0,
                 30, "every outcome and both DLQ reasons", interval=0.2)
        def seen(expr: str) -> bool:
            return bool(prometheus.values(expr))

        # A restart, so the restart panels have something to show: SIGKILL one worker,
        # once Prometheus has scraped the counter at 0 (else increase() sees no change).
        wait_for(lambda: seen('rmqpool_worker_restarts_total{reason="killed"} == 0'), 30,
                 "Prometheus to scrape the pool before the restart", interval=0.2)
        victim = pool.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: pool.metric("rmqpool_worker_restarts_total", reason="killed") >= 1,
                 30, "the killed worker to be counted", interval=0.1)
        wait_for(lambda: pool.is_ready() and victim not in pool.worker_pids(), 30,
                 "the killed worker to be replaced", interval=0.1)

        wait_for(lambda: seen(f'count_over_time(up{{job="rmqpool", instance="{instance}"}}'
                              '[1m]) >= 5')
                 and seen(f'up{{instance="{instance}"}} == 1')
                 and seen('rmqpool_worker_restarts_total{reason="killed"} > 0')
                 and seen('rmqpool_workers{state="ready"} == 2')
                 and seen('rmqpool_dead_letters_total{reason="max_retries"} > 0')
                 and seen('rmqpool_dead_letters_total{reason="rejected"} > 0'),
                 60, "Prometheus to scrape the load, the dead letters and the restart",
                 interval=0.5)
        yield Stack(pool, prometheus, queue, instance, served_families(pool))
    finally:
        errors = []
        if load.is_alive() or load.error is not None:
            try:
                load.stop()
            except BaseException as exc:
                errors.append(exc)
        prometheus.stop()
        queues = set(amqp.pool_queues(queue, delays=(RETRY_DELAY,)))
        if pool.proc is not None and pool.proc.poll() is None:  # and whatever it declared
            status, body = pool.get("/metrics")
            queues |= set(re.findall(r'^rmqpool_queue_messages\{queue="([^"]+)"', body, re.M))
        if pool.proc is not None and pool.proc.poll() is None:
            pool.signal(signal.SIGTERM)
            try:
                pool.wait(40)
            except subprocess.TimeoutExpired:
                pass
        pool.close()
        amqp.delete(sorted(queues))
        if errors:
            raise errors[0]


@needs_prometheus
@pytest.mark.timeout(150)
def test_prometheus_loads_the_alert_rules_healthy(stack: Stack) -> None:
    def rules() -> list[dict[str, Any]]:
        answer = stack.prometheus.api("rules")
        assert answer["status"] == "success", answer
        return [r for g in answer["data"]["groups"] for r in g["rules"]]

    loaded = rules()
    names = {r["name"] for r in loaded}
    assert names >= {"RmqpoolDown", "RmqpoolDeadLettering", "RmqpoolWorkerRestartStorm",
                     "RmqpoolWorkersNotReady", "RmqpoolQueueStalled",
                     "RmqpoolEventLoopLagHigh"}, names
    assert all(r["type"] == "alerting" for r in loaded)
    wait_for(lambda: all(r["health"] == "ok" for r in rules()), 20,
             "every rule to be evaluated with health ok", interval=0.5)
    for rule in rules():
        assert rule["health"] == "ok", rule
        assert rule["labels"].get("severity") in ("warning", "critical"), rule
        assert rule["annotations"].get("summary") and rule["annotations"].get("description")
        assert rule["duration"] > 0, f"{rule['name']} has no for:"


@needs_prometheus
@pytest.mark.timeout(150)
def test_alert_expressions_evaluate_and_dead_lettering_alert_goes_pending(
        stack: Stack) -> None:
    groups = stack.prometheus.api("rules")["data"]["groups"]
    for rule in (r for g in groups for r in g["rules"]):
        answer = stack.prometheus.query(rule["query"])
        assert answer["status"] == "success", (rule["name"], answer)
    # The pool dead-letters with both reasons: the rule sees the real series.
    def dead_lettering() -> set[str]:
        alerts = stack.prometheus.api("alerts")["data"]["alerts"]
        return {a["labels"]["reason"] for a in alerts
                if a["labels"]["alertname"] == "RmqpoolDeadLettering"
                and a["labels"]["queue"] == stack.queue
                and a["labels"]["instance"] == stack.instance
                and a["state"] in ("pending", "firing")}

    wait_for(lambda: dead_lettering() >= {"max_retries", "rejected"}, 20,
             "RmqpoolDeadLettering to be pending for both reasons", interval=0.5)
    # Nothing else is wrong with this pool (RmqpoolWorkersNotReady may linger pending for
    # an evaluation after the killed worker came back).
    def others() -> list[dict[str, Any]]:
        return [a for a in stack.prometheus.api("alerts")["data"]["alerts"]
                if a["labels"]["alertname"] != "RmqpoolDeadLettering"]

    wait_for(lambda: not others(), 10, "no other alert than RmqpoolDeadLettering",
             interval=0.5)


@needs_prometheus
@pytest.mark.timeout(150)
def test_dashboard_variables_have_values(stack: Stack) -> None:
    for var in load_dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"].strip())
        assert m, var["query"]
        selector = interpolate(m.group(1), stack.variables())
        found = {labels.get(m.group(2)) for labels, _ in
                 stack.prometheus.values(f"group by ({m.group(2)}) ({selector})")}
        expected = stack.queue if var["name"] == "queue" else stack.instance
        assert expected in found, (var["name"], found)


@needs_prometheus
@pytest.mark.timeout(150)
@pytest.mark.parametrize("panel", query_panels(), ids=lambda p: p["title"])
def test_dashboard_panel_has_data(stack: Stack, panel: dict[str, Any]) -> None:
    for target in panel["targets"]:
        expr = interpolate(target["expr"], stack.variables())
        answer = stack.prometheus.query(expr)
        assert answer["status"] == "success", (panel["title"], expr, answer)
        samples = stack.prometheus.values(expr)
        assert samples, f"panel {panel['title']!r}: no data for {expr}"
        assert any(math.isfinite(v) for _, v in samples), \
            f"panel {panel['title']!r}: only NaN/Inf for {expr}: {samples}"


@needs_prometheus
@pytest.mark.timeout(150)
def test_dashboard_shows_what_happened(stack: Stack) -> None:
    """The panels show the outcomes, DLQ reasons and the restart the fixture caused."""
    panels = {p["title"]: p for p in query_panels()}

    def by(title: str, label: str, ref: str = "A") -> dict[str, float]:
        target = next(t for t in panels[title]["targets"] if t["refId"] == ref)
        expr = interpolate(target["expr"], stack.variables())
        return {labels.get(label, ""): v for labels, v in stack.prometheus.values(expr)}

    outcomes = by("Throughput by outcome", "outcome")
    assert all(outcomes.get(o, 0) > 0 for o in ("acked", "retried", "dead_lettered")), outcomes
    reasons = by("Dead letters by reason in range", "reason")
    assert reasons.get("max_retries", 0) > 0 and reasons.get("rejected", 0) > 0, reasons
    assert by("Worker restarts in range", "")[""] >= 1
    states = by("Workers by state", "state")
    assert states == {"desired": 2, "running": 2, "ready": 2}, states
    lag = by("Event loop lag", "slot")
    assert len(lag) == 2, lag
    quantiles = [by("Handler latency", "", ref)[""] for ref in "ABC"]
    assert 0 < quantiles[0] <= quantiles[1] <= quantiles[2], quantiles
