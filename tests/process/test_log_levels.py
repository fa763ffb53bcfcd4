"""--log-level debug is for rmqpool's own lines (one per settled message); the AMQP
libraries have a level of their own, --library-log-level, quiet unless asked."""

from __future__ import annotations

import collections
import json
import signal
from typing import Any

import pytest

from tests.support import amqp
from tests.support.pool import Pool, wait_for
from tests.support.proxy import TcpProxy

HANDLER = "tests.support.handlers:record"
LIBRARIES = ("aiormq", "aio_pika", "pamqp")


def _records(pool: Pool) -> list[dict[str, Any]]:
    return [json.loads(line) for line in pool.log().splitlines()]  # every line is JSON


def _acked(pool: Pool) -> collections.Counter[str]:
    return collections.Counter(r["message_id"] for r in _records(pool) if r["msg"] == "acked")


@pytest.mark.timeout(60)
def test_debug_gives_one_acked_line_per_message_and_no_library_lines(queue, record_file,
                                                                     tmp_path):
    with TcpProxy("127.0.0.1", 5672) as proxy, \
            Pool(HANDLER, "--queue", queue, "--url", proxy.url(), "--workers", "1",
                 "--log-level", "debug", "--log-format", "json", tmp_path=tmp_path,
                 env={"RECORD_FILE": str(record_file)}) as pool:
        pool.wait_ready(15)
        ids = amqp.publish(queue, [{"n": i} for i in range(3)])
        wait_for(lambda: sum(_acked(pool).values()) >= 3, 10, "three acked lines")
        # A reconnect makes aiormq and aio-pika log tracebacks: not by default.
        proxy.cut()
        wait_for(lambda: pool.metric("rmqpool_broker_reconnects_total") >= 1, 20, "reconnected")
        wait_for(pool.is_ready, 20, "ready again")
        ids += amqp.publish(queue, [{"n": 3}])
        wait_for(lambda: sum(_acked(pool).values()) >= 4, 10, "four acked lines")
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
    records = _records(pool)
    library = [r for r in records if r["logger"].split(".")[0] in LIBRARIES]
    assert library == [], library[:5]
    assert _acked(pool) == {mid: 1 for mid in ids}
    assert any("lost" in r["msg"] for r in records)  # rmqpool's own line about the reconnect
    assert len(records) < 40, f"{len(records)} lines for 4 messages and a reconnect"


@pytest.mark.timeout(30)
def test_library_log_level_debug_shows_the_frames(queue, record_file, tmp_path):
    with Pool(HANDLER, "--queue", queue, "--workers", "1", "--log-format", "json",
              "--library-log-level", "debug", tmp_path=tmp_path,
              env={"RECORD_FILE": str(record_file)}) as pool:
        pool.wait_ready(15)
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
    records = _records(pool)
    assert any(r["logger"].startswith("aiormq") for r in records)
    assert not any(r["msg"] == "acked" for r in records)  # rmqpool's own level is still info
