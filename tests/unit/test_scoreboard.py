from rmqpool import scoreboard as sb
from rmqpool.outcome import Action, Reason


def test_settle_counts_and_histogram():
    board = sb.Scoreboard(concurrency=2, queues=3)
    board.settle(Action.ACK, None, 0.003, first_attempt=True)
    board.settle(Action.RETRY, None, 0.2, first_attempt=True)
    board.settle(Action.DEAD_LETTER, Reason.MAX_RETRIES, 7.0, first_attempt=False)
    board.settle(Action.DEAD_LETTER, Reason.MALFORMED, -1.0, first_attempt=True)
    cells = board.counters()
    assert cells[sb.RECEIVED] == 3
    assert cells[sb.PROCESSED["acked"]] == 1
    assert cells[sb.PROCESSED["retried"]] == 1
    assert cells[sb.PROCESSED["dead_lettered"]] == 2
    assert cells[sb.DEAD[Reason.MAX_RETRIES]] == 1 and cells[sb.DEAD[Reason.MALFORMED]] == 1
    assert cells[sb.DURATION_COUNT] == 3  # the malformed one never ran
    cumulative = sb.buckets_cumulative(cells)
    assert cumulative[-1] == 3
    assert cumulative[sb.BUCKETS.index(0.005)] == 1
    assert cumulative[sb.BUCKETS.index(0.25)] == 2
    assert abs(board.duration_sum() - 7.203) < 1e-9
    board.close()


def test_running_slots_and_depths():
    board = sb.Scoreboard(concurrency=2, queues=2)
    assert board.running() == [] and board.depths() == (0.0, [])
    board.start(1, 12345, "msg-" + "x" * 100)
    assert [r.key for r in board.running()] == [12345]
    assert board.running()[0].message_id == ("msg-" + "x" * 100)[:sb.ID_BYTES]
    assert board.ints[sb.IN_PROGRESS] == 1
    board.finish(1)
    assert board.running() == [] and board.ints[sb.IN_PROGRESS] == 0
    board.set_depths([4, 7])
    at, depths = board.depths()
    assert at > 0 and depths == [4, 7]
    board.close()
