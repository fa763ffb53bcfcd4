from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from tests.support import amqp


@pytest.fixture(scope="session", autouse=True)
def _delete_what_the_session_left() -> Iterator[None]:
    yield
    leftovers = amqp.leftover_queues()
    if leftovers:
        amqp.delete(leftovers)


@pytest.fixture
def queue() -> Iterator[str]:
    """A unique work queue name; the queue, its retry tiers and its DLQ are deleted after."""
    name = amqp.unique()
    yield name
    amqp.delete(amqp.pool_queues(name))


@pytest.fixture
def record_file(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "records.txt"
