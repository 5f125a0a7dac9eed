"""ReadAhead: the restore's helper thread that reads files while the engine thread decodes."""

import threading
import time

import pytest

from app.kvstore.read_ahead import ReadAhead


def test_results_come_in_order_from_another_thread():
    names = []

    def job(i):
        def run():
            names.append(threading.current_thread().name)
            time.sleep(0.002 * (5 - i))  # later jobs are quicker: order must not follow finishing time
            return i
        return run

    with ReadAhead([job(i) for i in range(5)]) as results:
        assert list(results) == [0, 1, 2, 3, 4]
        assert results.finished
    assert set(names) == {"parley-read-ahead"}


def test_the_hint_runs_after_the_first_job_not_before():
    events = []
    jobs = [lambda: events.append("job0") or 0, lambda: events.append("job1") or 1]
    with ReadAhead(jobs, hint=lambda: events.append("hint")) as results:
        assert list(results) == [0, 1]
    assert events == ["job0", "hint", "job1"]


def test_an_exception_arrives_at_its_place_and_later_jobs_do_not_run():
    ran = []

    def bad():
        raise ValueError("bad file")

    jobs = [lambda: 1, bad, lambda: ran.append(3) or 3]
    with ReadAhead(jobs) as results:
        assert next(results) == 1
        with pytest.raises(ValueError, match="bad file"):
            next(results)
        with pytest.raises(StopIteration):
            next(results)
    assert ran == []


def test_closing_early_stops_the_helper_even_when_its_queue_is_full():
    started = []

    def job(i):
        return lambda: started.append(i) or i

    results = ReadAhead([job(i) for i in range(100)], depth=2)
    assert next(results) == 0
    results.close()
    assert results.finished
    assert len(started) < 100  # it stopped instead of reading everything
