"""Soak: one message, one client or one dying process never takes the pool down, never
makes it loop, and never loses a message.

A real pool (3 workers, concurrency 2) behind a TCP proxy consumes a few thousand mixed
messages, published in rounds, while the test SIGKILLs workers, cuts every broker
connection once and sends one SIGHUP. Every body carries a token of its own, so each
published message is followed to its end: recorded "done" by the handler, or in the
DLQ with the reason its kind calls for. The /metrics counters must match that ledger
within the README's counting rule, the supervisor must live through all of it and exit
0 on SIGTERM, and the pool's log must show no internal error.

SOAK_SEED picks another (reproducible) mix, order, fault schedule and victims.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest

from rmqpool import topology as t
from tests.support import amqp
from tests.support.handlers import read_records, read_tokens
from tests.support.pool import Pool, is_gone
from tests.support.proxy import TcpProxy

# Not RMQPOOL_*: the pool inherits the environment and warns about unknown RMQPOOL_ names.
SEED = int(os.environ.get("SOAK_SEED", "1789"))
WORKERS, CONCURRENCY, PREFETCH = 3, 2, 10
DELAYS = (0.2, 0.5)  # --retry-delays
HANDLER_DELAY = 0.3  # Retry(delay=...) from the handler: a tier declared on first use
MAX_RETRIES, MAX_DEATHS, TIME_LIMIT = 2, 2, 2.0
ROUNDS = 10
PER_ROUND = {"ok": 300, "dup_id": 8, "fail": 8, "fail_until_2": 8, "retry": 8, "reject": 5}
SPECIAL = {"die": 3, "hang": 2}  # spread over the rounds with the malformed ones
FAULTS = ["kill"] * 6 + ["cut", "hup"]  # in a seeded order, after a calm first round
# The run's phases; the whole test stays well inside its pytest timeout even when the
# pool under test is broken (it then fails with the ledger instead of hanging).
FAULT_PHASE_BUDGET, SETTLE_UNTIL, STOP_TIMEOUT = 90.0, 120.0, 30.0
# README: a worker "that keeps dying within 5 s of starting is restarted with backoff".
# The test kills only workers older than that: one dying process at a time, not a storm.
QUICK_DEATH = 5.0

H_ATTEMPT = t.H_ATTEMPT
# x-rmqpool-attempt values rmqpool must refuse (dead-letter as malformed) instead of
# guessing an attempt number; each is sent with a body that would succeed and one that
# would fail, so a pool that runs it anyway shows it whichever way it goes wrong.
BAD_ATTEMPTS: dict[str, Any] = {
    "string": "two",
    # 1.8e308 itself is inf, which RabbitMQ refuses (it closes the publisher's channel:
    # no Erlang float is infinite) and pamqp sends floats as 32-bit: the largest one.
    "huge_float": 3.4e38,
    "negative": -3,
    "list": [1, 2],
    "over_int64": float(2**63),  # AMQP has no integer type this big: a float header
}
MALFORMED = ["not_json", "deep_json",
             *(f"attempt_{name}/{body}" for name in BAD_ATTEMPTS for body in ("ok", "fail"))]

# What `behave` is asked to do, by kind (see tests/support/handlers.py).
BEHAVIOUR: dict[str, dict[str, Any]] = {
    "fail": {"fail": "soak"}, "fail_until_2": {"fail_until": 2},
    "retry": {"retry_delay": HANDLER_DELAY}, "reject": {"reject": "soak"},
    "die": {"die": True}, "hang": {"hang": True}}
EXPECT = {"ok": "done", "dup_id": "done", "fail": "max_retries", "fail_until_2": "done",
          "retry": "done", "reject": "rejected", "die": "poison", "hang": "time_limit",
          **{kind: "malformed" for kind in MALFORMED}}


@dataclasses.dataclass(frozen=True)
class Sent:
    token: str
    kind: str
    message_id: str
    round: int

    @property
    def expect(self) -> str:
        """"done" (handled and acked) or the reason it must be dead-lettered with."""
        return EXPECT[self.kind]


RUN = uuid.uuid4().hex[:6]
TOKEN_RE = re.compile(rb"T[0-9a-f]{6}n\d{5}")


class Mix:
    """The messages of the run: what was sent, and how."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.sent: list[Sent] = []

    def _token(self) -> str:
        return f"T{RUN}n{len(self.sent):05d}"

    def make(self, kind: str, rnd: int) -> list[aio_pika.Message]:
        """One message of `kind` (two for dup_id: different bodies, one message id)."""
        mid = uuid.uuid4().hex
        if kind == "dup_id":
            out = []
            for variant in ("first", "second"):
                token = self._token()
                self.sent.append(Sent(token, kind, mid, rnd))
                out.append(_json({"token": token, "variant": variant}, mid))
            return out
        token = self._token()
        self.sent.append(Sent(token, kind, mid, rnd))
        body: dict[str, Any] = {"token": token}
        if kind == "ok":
            if self.rng.random() < 0.5:
                body["sleep"] = round(self.rng.uniform(0.001, 0.01), 4)
            return [_json(body, mid)]
        if kind == "not_json":
            return [_raw(f'{{"token": "{token}", this is not JSON'.encode(), mid)]
        if kind == "deep_json":  # valid JSON, nested deeper than Python's recursion limit
            return [_raw(("[" * 5000 + json.dumps(token) + "]" * 5000).encode(), mid)]
        if kind.startswith("attempt_"):
            name, outcome = kind.removeprefix("attempt_").split("/")
            if outcome == "fail":
                body["fail"] = "soak"
            return [_json(body, mid, {H_ATTEMPT: BAD_ATTEMPTS[name]})]
        body.update(BEHAVIOUR[kind])
        return [_json(body, mid)]

    def rounds(self) -> list[list[aio_pika.Message]]:
        specials = [k for k, n in SPECIAL.items() for _ in range(n)] + MALFORMED
        self.rng.shuffle(specials)
        out = []
        for rnd in range(ROUNDS):
            units = [k for k, n in PER_ROUND.items() for _ in range(n)]
            units += specials[rnd::ROUNDS]
            self.rng.shuffle(units)
            # A dup_id pair stays adjacent (a publisher resending under the same id): both
            # land in one prefetch window, where one can be mistaken for the other.
            out.append([m for kind in units for m in self.make(kind, rnd)])
        return out

    def by_kind(self) -> collections.Counter[str]:
        return collections.Counter(s.kind for s in self.sent)


def _json(body: dict[str, Any], mid: str, headers: dict[str, Any] | None = None
          ) -> aio_pika.Message:
    return _raw(json.dumps(body).encode(), mid, headers)


def _raw(body: bytes, mid: str, headers: dict[str, Any] | None = None) -> aio_pika.Message:
    return aio_pika.Message(body, content_type="application/json", message_id=mid,
                            headers=headers, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


def poll(condition: Callable[[], Any], timeout: float, interval: float = 0.1) -> bool:
    """Like wait_for, but says whether it came true instead of failing: a fault step that
    does not recover is recorded and the run goes on, so the ledger shows what it cost."""
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


class Soak:
    def __init__(self, pool: Pool, proxy: TcpProxy, mix: Mix, record_file: Any,
                 rng: random.Random) -> None:
        self.pool, self.proxy, self.mix, self.record_file, self.rng = (
            pool, proxy, mix, record_file, rng)
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.kills = 0
        self.victims_killed: list[str] = []  # "slot S pid P at Ts", for the summary
        self.killed_pids: list[int] = []
        self.cut_connections = 0
        self.cut_events = 0
        self.t0 = time.monotonic()
        self.supervisor_died_at: float | None = None

    # -- observing ------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def alive(self) -> bool:
        assert self.pool.proc is not None
        if self.pool.proc.poll() is None:
            return True
        if self.supervisor_died_at is None:
            self.supervisor_died_at = self.elapsed()
            self.problems.append(
                f"the supervisor died {self.supervisor_died_at:.1f}s into the run "
                f"(exit code {self.pool.proc.returncode})")
        return False

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, _ = self.pool.get("/metrics")
        return self.pool.metrics() if status == 200 else {}

    def workers(self) -> list[dict[str, Any]]:
        return list(self.pool.health().get("workers", []))

    def busy_with(self, kinds: set[str]) -> set[int]:
        """Pids that ever started a message of these kinds."""
        tokens = {s.message_id for s in self.mix.sent if s.kind in kinds}
        return {pid for mid, _, pid, tag in read_records(self.record_file)
                if tag == "start" and mid in tokens}

    def hang_running(self) -> bool:
        # The supervisor kills every worker that runs a hang message: one still alive is
        # running one now.
        return any(not is_gone(pid) for pid in self.busy_with({"hang"}))

    def spare_hangs(self, what: str) -> None:
        """Wait (a while) for a moment no hang message runs: a worker that drains for a
        reload gets --graceful-timeout for its handlers, and a hung one would hold up the
        reload that long, which is not what this test is about."""
        if not poll(lambda: not self.hang_running() or not self.alive(), 15):
            self.notes.append(f"{what} at {self.elapsed():.1f}s while a hang message ran")

    # -- faults -----------------------------------------------------------------------------
    def victims(self, min_age: float = QUICK_DEATH) -> list[tuple[int, int]]:
        """(slot, pid) of the workers the test may kill: ready, older than `min_age`, and
        never one that ran a hang or die message (the supervisor kills those itself, and a
        death charged on top would change how many attempts they get)."""
        spared = self.busy_with({"hang", "die"})
        return sorted((w["slot"], w["pid"]) for w in self.workers()
                      if w.get("state") == "ready" and w["pid"] not in spared
                      and _age(w["pid"]) >= min_age)

    def await_victim(self) -> bool:
        return poll(lambda: self.victims() or not self.alive(), 15)

    def kill_a_worker(self) -> None:
        ready = self.victims() if self.await_victim() else []
        if not ready:
            ready = self.victims(0.0)
            self.notes.append(f"kill at {self.elapsed():.1f}s: no worker older than "
                              f"{QUICK_DEATH:g}s for 15s; "
                              + ("killed a younger one" if ready else "no ready one: skipped"))
        if not ready:
            return
        slot, pid = self.rng.choice(ready)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            self.notes.append(f"kill at {self.elapsed():.1f}s: pid {pid} already gone")
            return
        self.kills += 1
        self.killed_pids.append(pid)
        self.victims_killed.append(f"{slot}:{pid}@{self.elapsed():.1f}s")
        if not poll(lambda: pid not in self.pool.worker_pids() or not self.alive(), 10):
            self.problems.append(f"SIGKILLed worker {slot} (pid {pid}) still listed after 10s")

    def cut_connections_once(self) -> None:
        before = self.metrics().get(("rmqpool_broker_reconnects_total", ()), 0.0)
        cut = self.proxy.cut()
        self.cut_connections += cut
        self.cut_events += 1
        if not cut:
            self.problems.append(f"cut at {self.elapsed():.1f}s: no worker had a broker "
                                 "connection to cut")
            return

        def back() -> bool:
            m = self.metrics()
            return (m.get(("rmqpool_broker_reconnects_total", ()), 0.0) > before
                    and self.pool.is_ready()) or not self.alive()

        if not poll(back, 20, 0.2):
            self.problems.append(f"{cut} connection(s) cut at {self.elapsed():.1f}s: the pool "
                                 "did not reconnect and become ready within 20s")

    def reload(self) -> None:
        self.spare_hangs("SIGHUP")
        old = set(self.pool.worker_pids())
        self.pool.signal(signal.SIGHUP)

        def rolled() -> bool:
            pids = set(self.pool.worker_pids())
            return (len(pids) == WORKERS and not pids & old
                    and self.pool.is_ready()) or not self.alive()

        if not poll(rolled, 30, 0.2):
            self.problems.append(
                f"SIGHUP at {self.elapsed():.1f}s: the rolling reload did not finish within "
                f"30s (old workers still running: {sorted(old & set(self.pool.worker_pids()))})")

    # -- the run -------------------------------------------------------------------------------
    def run(self, queue: str, rounds: list[list[aio_pika.Message]], faults: list[str]) -> None:
        budget_end = time.monotonic() + FAULT_PHASE_BUDGET
        actions = {"kill": self.kill_a_worker, "cut": self.cut_connections_once,
                   "hup": self.reload}
        for rnd, (messages, fault) in enumerate(zip(rounds, faults, strict=True)):
            if fault == "kill" and time.monotonic() < budget_end:
                self.await_victim()  # before publishing: strike while the round is consumed
            amqp.publish_messages(queue, messages)
            # Strike while this round is being consumed: once a random share of its ok
            # messages is done (so deliveries, retries and confirms are in flight).
            ok = {s.token for s in self.mix.sent if s.round == rnd and s.kind == "ok"}
            share = self.rng.uniform(0.2, 0.7)

            def struck_while_busy(ok: set[str] = ok, share: float = share) -> bool:
                done = ok & set(read_tokens(self.record_file))
                return len(done) >= share * len(ok) or not self.alive()

            reached = poll(struck_while_busy, min(20.0, budget_end - time.monotonic()))
            if not self.alive():
                return
            if not reached:
                self.notes.append(f"round {rnd}: {share:.0%} of its ok messages not done in "
                                  "time; went on")
            if fault and time.monotonic() > budget_end:
                # The pool is too slow to go on hurting it: publish the rest, keep the ledger.
                self.notes.append(f"round {rnd}: {fault} skipped, fault phase over its budget")
            elif fault:
                actions[fault]()
            if not self.alive():
                return


def _age(pid: int) -> float:
    """Seconds since process `pid` started (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - started
    except (OSError, IndexError, ValueError):
        return 0.0


def _reason(message: aio_pika.abc.AbstractIncomingMessage) -> str:
    value = (message.headers or {}).get(t.H_REASON)
    return value.decode() if isinstance(value, bytes) else str(value)


def _token_of(message: aio_pika.abc.AbstractIncomingMessage) -> str:
    found = TOKEN_RE.search(message.body)
    return found.group().decode() if found else f"?{message.message_id}"


@dataclasses.dataclass
class Ends:
    """Where the messages are once the pool has stopped."""

    left: dict[str, list[str]]  # token -> queues a copy was left in
    dead: dict[str, list[str]]  # token -> the reasons of its DLQ copies
    attempts: dict[str, list[Any]]  # token -> x-rmqpool-attempt of its DLQ copies
    done: collections.Counter[str]  # token -> "done" records
    started: collections.Counter[str]  # token -> "start" records
    started_ids: set[str]  # message ids the handler started (also without a token)

    @classmethod
    def collect(cls, queue: str, retry_queues: list[str], record_file: Any) -> Ends:
        left: dict[str, list[str]] = collections.defaultdict(list)
        for name in [*retry_queues, queue]:  # retries first: they expire into the queue
            if amqp.count(name) is not None:
                for msg in amqp.get_all(name):
                    left[_token_of(msg)].append(name)
        dead: dict[str, list[str]] = collections.defaultdict(list)
        attempts: dict[str, list[Any]] = collections.defaultdict(list)
        dlq = t.dlq_name(queue)
        for msg in amqp.get_all(dlq) if amqp.count(dlq) is not None else []:
            dead[_token_of(msg)].append(_reason(msg))
            attempts[_token_of(msg)].append((msg.headers or {}).get(H_ATTEMPT))
        return cls(left, dead, attempts, read_tokens(record_file, "done"),
                   read_tokens(record_file, "start"),
                   {mid for mid, _, _, tag in read_records(record_file) if tag == "start"})

    def copies(self) -> collections.Counter[str]:
        """DLQ copies by reason."""
        return collections.Counter(r for reasons in self.dead.values() for r in reasons)

    def fate(self, s: Sent, queue: str) -> str:
        """Where a message ended up, in words: "done", "DLQ <reason>", "left in <queue>",
        several of them, or "NOWHERE" (lost)."""
        places = ["done"] if self.done[s.token] else []
        places += sorted({f"DLQ {r}" for r in self.dead.get(s.token, [])})
        places += sorted({f"left in {_short(q, queue)}" for q in self.left.get(s.token, [])})
        if s.expect == "malformed" and (self.started[s.token] or s.message_id in
                                        self.started_ids):
            places.append("the handler ran on it")
        return " + ".join(places) or "NOWHERE (lost)"

    def retries_of(self, s: Sent) -> int:
        """Retries a message is to be counted with; for a dead-lettered one as many as its
        DLQ copy says it had (a hang message may have fewer than MAX_RETRIES: a cut while
        it runs has it run again beside the stuck run, and both time-limit kills are
        charged to one attempt)."""
        if s.expect in ("done", "malformed", "rejected", "poison"):
            return 1 if s.kind in ("fail_until_2", "retry") else 0
        numbers = [a for a in self.attempts.get(s.token, []) if isinstance(a, int)]
        return max(numbers) - 1 if numbers else MAX_RETRIES


def check_fates(mix: Mix, ends: Ends, queue: str, log: str) -> list[str]:
    """Every message done, or in the DLQ with its kind's reason; lost ones first."""
    last_words = {}  # message id -> the pool's last log line about it
    for line in log.splitlines():
        if found := re.search(r" message_id=(\w+)", line):
            last_words[found.group(1)] = re.sub(r"^.*?\] ", "", line)[:200]
    wrong: dict[tuple[int, str], list[str]] = collections.defaultdict(list)
    for s in mix.sent:
        got = ends.fate(s, queue)
        want = "done" if s.expect == "done" else f"DLQ {s.expect}"
        if got != want:
            rank = 0 if "NOWHERE" in got else 1 if "left in" in got else 2
            said = f"; its id last logged: {last_words[s.message_id]!r}" if (
                rank == 0 and s.message_id in last_words) else ""
            wrong[(rank, f"{s.kind}: expected {want}, got {got}")].append(
                f"{s.token} (id {s.message_id[:8]}, round {s.round}{said})")
        # Always failing: dead-lettered after exactly max-retries retries, every copy.
        if s.kind == "fail" and ends.dead.get(s.token) and set(ends.attempts[s.token]) != {
                MAX_RETRIES + 1}:
            wrong[(2, f"fail: DLQ copies say attempt {sorted(map(str, ends.attempts[s.token]))},"
                      f" expected {MAX_RETRIES + 1}")].append(f"{s.token} (round {s.round})")
    tokens = {s.token for s in mix.sent}
    for token in sorted(set(ends.left) - tokens):
        wrong[(1, "a message the test did not publish left in a queue")].append(token)
    for token in sorted(set(ends.dead) - tokens):
        wrong[(2, "a message the test did not publish in the DLQ")].append(token)
    return [f"{what}: {len(items)} message(s): {_examples(items)}"
            for (_, what), items in sorted(wrong.items())]


def check_counters(m: dict[Any, float], mix: Mix, ends: Ends, soak: Soak,
                   queue: str) -> list[str]:
    """/metrics against the ledger, within the README's counting rule: a worker that dies
    (or loses its connection) while the broker holds a retry or dead-letter copy it has
    not confirmed yet leaves the copy AND gets the original back, so that message is
    retried or dead-lettered twice. At most one per handler thread per death or cut
    connection: the test's kills, the connections it cut, the deaths its die and hang
    messages cause. A duplicated retry copy is retried again at each later attempt. Such
    a first copy is in the DLQ uncounted (its worker died before counting it)."""
    kinds = mix.by_kind()
    deaths = kinds["die"] * (MAX_DEATHS + 1) + kinds["hang"] * (MAX_RETRIES + 1)
    excess = (soak.kills + soak.cut_connections + deaths) * CONCURRENCY
    problems = []

    def within(what: str, got: float, low: int, slack: int) -> None:
        if not low <= got <= low + slack:
            problems.append(f"metrics: {what} = {got:g}, expected {low}"
                            + (f" to {low + slack} (duplicates allowed: {slack})"
                               if slack else ""))

    def counter(name: str, **labels: str) -> float:
        return m.get((name, tuple(sorted({**labels, "queue": queue}.items()))), 0.0)

    # Received counts first attempts: a duplicated copy is a later attempt, so exact.
    within("received", counter("rmqpool_messages_received_total"), len(mix.sent), 0)
    within("processed{acked}", counter("rmqpool_messages_processed_total", outcome="acked"),
           sum(1 for s in mix.sent if s.expect == "done"), excess)
    within("processed{retried}",
           counter("rmqpool_messages_processed_total", outcome="retried"),
           sum(ends.retries_of(s) for s in mix.sent), excess * MAX_RETRIES)
    dead_total = counter("rmqpool_messages_processed_total", outcome="dead_lettered")
    within("processed{dead_lettered}", dead_total,
           sum(1 for s in mix.sent if s.expect != "done"), excess)
    by_reason = {dict(k[1])["reason"]: v for k, v in m.items()
                 if k[0] == "rmqpool_dead_letters_total" and dict(k[1]).get("queue") == queue}
    expect_dead = collections.Counter(s.expect for s in mix.sent if s.expect != "done")
    copies = ends.copies()
    for reason in sorted(set(by_reason) | set(expect_dead)):
        counted = int(by_reason.get(reason, 0.0))
        within(f"dead_letters_total{{reason={reason}}}", counted, expect_dead[reason], excess)
        if not counted <= copies[reason] <= counted + excess:
            problems.append(f"metrics: dead_letters_total{{reason={reason}}} = {counted} but "
                            f"the DLQ holds {copies[reason]} such copies (expected {counted} "
                            f"to {counted + excess})")
    if sum(by_reason.values()) != dead_total:
        problems.append(f"metrics: dead_letters_total sums to {sum(by_reason.values()):g}, "
                        f"processed{{dead_lettered}} = {dead_total:g}")
    if counter("rmqpool_messages_in_progress") != 0:
        problems.append(f"metrics: {counter('rmqpool_messages_in_progress'):g} messages "
                        "still in progress at the end")
    return problems


def check_restarts(restarts: dict[str, int], mix: Mix, soak: Soak) -> list[str]:
    """Never loops: every worker death is one the test caused or a message earned."""
    kinds = mix.by_kind()
    # A die message can start on the victim in the instant between choosing it and the
    # SIGKILL: that worker exits 13 (a crash) or by the signal, whichever comes first.
    raced = len(set(soak.killed_pids) & soak.busy_with({"die"}))
    limits = {"killed": (soak.kills - raced, soak.kills),
              "crash": (0, kinds["die"] * (MAX_DEATHS + 1)),
              # A fault can duplicate a hang message's copy (a cut, its run): each line
              # of copies is time-limit killed up to MAX_RETRIES + 1 times.
              "time_limit": (0, (kinds["hang"] + soak.kills + soak.cut_events)
                             * (MAX_RETRIES + 1)),
              "reload": (0, WORKERS)}
    problems = []
    for reason, count in sorted(restarts.items()):
        low, high = limits.get(reason, (0, 0))
        if not low <= count <= high:
            problems.append(f"worker restarts{{reason={reason}}} = {count}, expected "
                            + (f"{low}" if low == high else f"at most {high}" if not low
                               else f"{low} to {high}"))
    return problems


def _log_errors(log: str) -> list[str]:
    """Internal errors and tracebacks through rmqpool's own code, one line per kind of
    error with how often it happened and its innermost rmqpool frame."""
    found: collections.Counter[str] = collections.Counter()
    found.update(re.sub(r"^.*?\] ", "", line) for line in log.splitlines()
                 if "internal error" in line)
    for block in re.findall(r"Traceback \(most recent call last\):\n(?:[ \t].*\n|\n)*.*",
                            log):
        frames = re.findall(r'File "[^"]*/(rmqpool/[^"]+)", line (\d+), in (\w+)', block)
        if frames:
            file, line, fn = frames[-1]
            found[f"{block.splitlines()[-1].strip()} (at {file}:{line} in {fn})"] += 1
    return [f"{n} x {what}" for what, n in found.most_common()]


def _short(name: str, queue: str) -> str:
    return "the work queue" if name == queue else name.removeprefix(queue)


def _examples(items: list[str], n: int = 8) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return "; ".join(items[:n]) + more


def _mix_in_words(kinds: collections.Counter[str]) -> str:
    plain = [f"{kind} {n}" for kind, n in sorted(kinds.items()) if kind not in MALFORMED]
    return ", ".join([*plain, f"malformed {sum(kinds[k] for k in MALFORMED)}"])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_soak_faults_never_lose_loop_or_take_the_pool_down(queue, record_file, tmp_path,
                                                           request):
    delays = (*DELAYS, HANDLER_DELAY)
    retry_queues = [t.retry_queue_name(queue, d) for d in delays]
    dlq = t.dlq_name(queue)
    request.addfinalizer(lambda: amqp.delete(amqp.pool_queues(queue, delays)))
    rng = random.Random(SEED)
    mix = Mix(rng)
    rounds = mix.rounds()
    order = FAULTS[:]
    rng.shuffle(order)
    faults = ["", *order, *[""] * (ROUNDS - 1 - len(order))]
    expect_done = {s.token for s in mix.sent if s.expect == "done"}
    n_dead = len(mix.sent) - len(expect_done)

    with TcpProxy("127.0.0.1", 5672) as proxy, \
            Pool("tests.support.handlers:behave", "--queue", queue, "--url", proxy.url(),
                 "--workers", str(WORKERS), "--concurrency", str(CONCURRENCY),
                 "--prefetch", str(PREFETCH), "--retry-delays", ",".join(map(str, DELAYS)),
                 "--max-retries", str(MAX_RETRIES), "--time-limit", str(TIME_LIMIT),
                 "--max-worker-deaths", str(MAX_DEATHS), "--graceful-timeout", "10",
                 tmp_path=tmp_path, env={"RECORD_FILE": str(record_file)}) as pool:
        pool.wait_ready(30)
        soak = Soak(pool, proxy, mix, record_file, rng)
        soak.run(queue, rounds, faults)
        t_faults = soak.elapsed()

        def settled() -> bool:
            """Everything done or dead-lettered, the queues empty, the counters caught up
            (lower bounds; the exact ledger is checked after), every worker ready."""
            if not soak.alive():
                return True  # nothing more will happen
            if not expect_done <= set(read_tokens(record_file)):
                return False
            depth = amqp.counts([queue, *retry_queues, dlq])
            if any(depth[q] for q in [queue, *retry_queues]) or (depth[dlq] or 0) < n_dead:
                return False
            m = soak.metrics()
            q = ("queue", queue)
            counted_dead = sum(v for (name, _), v in m.items()
                               if name == "rmqpool_dead_letters_total")
            return (pool.is_ready() and m.get(("rmqpool_messages_in_progress", (q,))) == 0
                    and m.get(("rmqpool_messages_received_total", (q,)), 0) >= len(mix.sent)
                    and m.get(("rmqpool_messages_processed_total",
                               (("outcome", "acked"), q)), 0) >= len(expect_done)
                    and (depth[dlq] or 0) >= counted_dead >= n_dead)

        is_settled = poll(settled, SETTLE_UNTIL - soak.elapsed(), 0.5)
        t_settled = soak.elapsed()
        alive_at_end = soak.alive()
        m = soak.metrics() if alive_at_end else {}
        ready_at_end = alive_at_end and pool.is_ready()
        workers_at_end = soak.workers() if alive_at_end else []
        code: int | None = pool.proc.returncode if pool.proc else None
        took = 0.0
        if alive_at_end:
            try:
                code, took = pool.stop_with(signal.SIGTERM, STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                code, took = None, STOP_TIMEOUT
        log = pool.log()

    ends = Ends.collect(queue, retry_queues, record_file)
    restarts = {dict(k[1])["reason"]: int(v) for k, v in m.items()
                if k[0] == "rmqpool_worker_restarts_total"}
    problems = [*soak.problems, *check_fates(mix, ends, queue, log)]
    if m:
        problems += check_counters(m, mix, ends, soak, queue)
        problems += check_restarts(restarts, mix, soak)
    if not is_settled and soak.supervisor_died_at is None:
        problems.append(f"not settled {SETTLE_UNTIL:g}s into the run (every message done or "
                        "dead-lettered, queues empty, counters caught up, pool ready)")
    if alive_at_end and not ready_at_end:
        problems.append("the pool was not ready at the end: " + (
            ", ".join(f"slot {w['slot']} {w['state']}" for w in workers_at_end)
            or "no worker process at all (every slot waiting out its restart backoff)"))
    if alive_at_end and code != 0:
        problems.append(f"the supervisor exited with {code} on SIGTERM, not 0 "
                        + ("(it did not exit in time)" if code is None else f"after {took:.1f}s"))
    problems += [f"pool log: {error}" for error in _log_errors(log)[:8]]

    summary = (
        f"soak seed {SEED}: {len(mix.sent)} messages ({_mix_in_words(mix.by_kind())})"
        f"\n  faults: {soak.kills} SIGKILLs, {soak.cut_connections} connections cut, 1 SIGHUP"
        f" (order {order}); restarts {restarts}"
        f"\n  killed (slot:pid@time): {' '.join(soak.victims_killed)}"
        f"\n  time: faults {t_faults:.1f}s, settled at {t_settled:.1f}s"
        f" ({'yes' if is_settled else 'NO'}), stopped at {soak.elapsed():.1f}s"
        f"\n  DLQ copies by reason {dict(ends.copies())}; done more than once: "
        f"{sum(1 for n in ends.done.values() if n > 1)}; log {pool.log_path}"
        + "".join(f"\n  note: {n}" for n in soak.notes))
    print("\n" + summary)
    assert not problems, summary + "\n" + "\n".join(f"- {p}" for p in problems)
