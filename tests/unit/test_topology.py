from rmqpool import topology as t
from rmqpool.settings import resolve


def test_names_and_arguments_classic():
    s = resolve("m:f", {"queue": "jobs", "retry_delays": (1.0, 0.25)}, {})
    queues = {q.name: q.arguments for q in t.all_queues(s)}
    assert set(queues) == {"jobs", "jobs.dlq", "jobs.retry.1s", "jobs.retry.250ms"}
    assert queues["jobs"] == {}
    assert queues["jobs.retry.250ms"] == {
        "x-message-ttl": 250, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "jobs"}
    # The work queue is declared first: a clash with an existing one creates nothing else.
    assert t.all_queues(s)[0].name == "jobs"


def test_quorum_queues_dead_letter_at_least_once():
    s = resolve("m:f", {"queue": "jobs", "queue_type": "quorum"}, {})
    work = t.work_queue(s).arguments
    assert work["x-queue-type"] == "quorum"
    assert work["x-dead-letter-strategy"] == "at-least-once"
    assert work["x-overflow"] == "reject-publish"
    assert work["x-dead-letter-routing-key"] == "jobs.dlq"
    assert work["x-delivery-limit"] == t.QUORUM_DELIVERY_LIMIT
    assert t.retry_queue(s, 10).arguments["x-queue-type"] == "quorum"


def test_jitter_spreads_each_tier_over_its_own_queues():
    assert t.jittered(10.0, 0.0) == (10.0,)
    assert t.jittered(10.0, 0.3) == (7.0, 8.0, 9.0, 10.0)
    s = resolve("m:f", {"queue": "j", "retry_delays": (1.0, 10.0), "retry_jitter": 0.3}, {})
    names = {q.name for q in t.all_queues(s)}
    assert {"j.retry.700ms", "j.retry.1s", "j.retry.7s", "j.retry.10s"} <= names
    assert len(names) == 2 + 8


def test_queue_args_go_to_the_work_queue_only():
    s = resolve("m:f", {"queue": "jobs", "queue_arg": ["x-max-length=5"]}, {})
    queues = {q.name: q.arguments for q in t.all_queues(s)}
    assert queues["jobs"] == {"x-max-length": 5}
    assert all("x-max-length" not in args for name, args in queues.items() if name != "jobs")
    s = resolve("m:f", {"queue": "jobs", "queue_type": "quorum",
                        "queue_arg": ["x-max-length=5"]}, {})
    own = t.own_work_queue_args("quorum", "jobs")
    assert t.work_queue(s).arguments == {"x-max-length": 5, **own}
