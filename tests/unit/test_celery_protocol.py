"""rmqpool.celery.task_message: the Celery protocol v2 message, field by field, and
compared with what Celery's own builder makes of the same call (celery is a test
dependency; rmqpool never imports it). That a real worker runs it is
tests/integration/test_celery.py."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from typing import Any

import pytest

from rmqpool import celery as protocol
from rmqpool.outgoing import encode_body
from tests.support.pool import ROOT

NOW = datetime.datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.UTC)
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def test_headers_name_the_task_and_its_id():
    task = protocol.task_message("proj.add", (1, 2), {"z": 3}, task_id="tid", now=NOW)
    h = task.headers
    assert task.task_id == h["id"] == h["root_id"] == "tid"
    assert (h["lang"], h["task"], h["parent_id"], h["group"], h["retries"]) == (
        "py", "proj.add", None, None, 0)
    assert h["timelimit"] == [None, None]
    assert h["eta"] is None and h["expires"] is None and task.ttl is None
    assert (h["argsrepr"], h["kwargsrepr"]) == ("(1, 2)", "{'z': 3}")
    assert "@" in h["origin"]


def test_a_task_id_is_made_when_none_is_given_and_differs_each_time():
    a, b = protocol.task_message("t"), protocol.task_message("t")
    assert a.task_id and a.task_id != b.task_id and a.headers["id"] == a.task_id


def test_body_is_args_kwargs_and_the_embed_three_elements_as_json():
    task = protocol.task_message("t", iter([1, "a"]), None, now=NOW)
    assert task.body == [[1, "a"], {}, EMBED]
    data, content_type = encode_body(task.body)
    assert content_type == "application/json"
    assert json.loads(data) == [[1, "a"], {}, EMBED]


def test_countdown_becomes_an_eta_from_now():
    task = protocol.task_message("t", countdown=2.5, now=NOW)
    assert task.headers["eta"] == "2030-01-02T03:04:08.178901+00:00"


def test_eta_keeps_its_offset_and_a_naive_one_is_utc():
    plus5 = datetime.timezone(datetime.timedelta(hours=5))
    eta = datetime.datetime(2030, 1, 2, 8, 0, tzinfo=plus5)
    assert protocol.task_message("t", eta=eta, now=NOW).headers["eta"] == (
        "2030-01-02T08:00:00+05:00")
    naive = datetime.datetime(2030, 1, 2, 8, 0)
    assert protocol.task_message("t", eta=naive, now=NOW).headers["eta"] == (
        "2030-01-02T08:00:00+00:00")


@pytest.mark.parametrize(("expires", "iso", "ttl"), [
    (60, "2030-01-02T03:05:05.678901+00:00", 60.0),
    (0.5, "2030-01-02T03:04:06.178901+00:00", 0.5),
    (-5, "2030-01-02T03:04:00.678901+00:00", 0.0),  # already expired: TTL 0
    (NOW + datetime.timedelta(minutes=1), "2030-01-02T03:05:05.678901+00:00", 60.0),
    (datetime.datetime(2030, 1, 2, 3, 14, 5, 678901), "2030-01-02T03:14:05.678901+00:00",
     600.0),  # naive: UTC
])
def test_expires_seconds_or_datetime_becomes_iso_and_the_ttl(expires, iso, ttl):
    task = protocol.task_message("t", expires=expires, now=NOW)
    assert task.headers["expires"] == iso
    assert task.ttl == pytest.approx(ttl)


def test_countdown_with_eta_is_refused():
    with pytest.raises(ValueError, match="countdown or eta, not both"):
        protocol.task_message("t", countdown=1, eta=NOW)


@pytest.mark.parametrize("name", ["", None])
def test_a_task_needs_a_name(name):
    with pytest.raises(ValueError, match="registered name"):
        protocol.task_message(name)


@pytest.mark.parametrize("args", ["x", b"ab", {"a": 1}])
def test_args_that_are_not_a_sequence_of_arguments_are_refused(args):
    with pytest.raises(TypeError, match="args must be a list or tuple"):
        protocol.task_message("t", args)


def test_kwargs_keys_must_be_str():
    kwargs: Any = {1: "one"}  # JSON would make it "1" quietly
    with pytest.raises(TypeError, match="keys must be str"):
        protocol.task_message("t", (), kwargs)


def test_long_reprs_are_cut_like_celerys_so_the_header_frame_stays_small():
    task = protocol.task_message("t", ("x" * 200_000,), {"k": "y" * 200_000})
    for key in ("argsrepr", "kwargsrepr"):
        assert len(task.headers[key]) == protocol.REPR_MAXSIZE
        assert task.headers[key].endswith("...")
    assert task.body[0] == ["x" * 200_000] and task.body[1] == {"k": "y" * 200_000}


def celerys(**call: Any) -> tuple[dict[str, Any], Any]:
    """Celery's own AMQP.as_task_v2 for the same call: (headers, body)."""
    from celery import Celery

    app = Celery("rmqpool-unit", set_as_current=False)
    message = app.amqp.as_task_v2(call.pop("task_id"), call.pop("name"), now=NOW, **call)
    return message.headers, message.body


@pytest.mark.parametrize("call", [
    {"args": (1, "a", None), "kwargs": {"k": [1.5, {"x": True}]}},
    {"args": (), "kwargs": {}, "countdown": 3},
    {"args": (2,), "kwargs": {}, "eta": NOW + datetime.timedelta(hours=1), "expires": 30},
    {"args": (), "kwargs": {}, "expires": NOW + datetime.timedelta(days=1)},
])
def test_same_headers_and_body_as_celerys_own_builder(call):
    ours = protocol.task_message("proj.tasks.add", task_id="tid", now=NOW, **call)
    headers, body = celerys(name="proj.tasks.add", task_id="tid", **call)
    # Every header Celery sends, with the same value (origin names the sender). Celery
    # before 5.3.5 sends no replaced_task_nesting; its workers ignore it.
    assert set(headers) <= set(ours.headers)
    assert {k: ours.headers[k] for k in headers if k != "origin"} == {
        k: v for k, v in headers.items() if k != "origin"}
    assert ours.body == json.loads(json.dumps(body))  # Celery's tuples are JSON lists


def test_rmqpool_builds_tasks_without_celery_installed():
    """Celery is blocked from being imported; rmqpool and its send_task still load."""
    code = ("import sys; sys.modules['celery'] = None\n"
            "import rmqpool, rmqpool.celery\n"
            "assert rmqpool.Publisher.send_task and rmqpool.celery.task_message('t').task_id\n"
            "assert not any(m == 'celery' or m.startswith('celery.') for m in sys.modules"
            " if sys.modules[m] is not None)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT)
