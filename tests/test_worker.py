"""The background worker: jobs in order on one thread, a bounded queue, errors kept, a drain."""

from __future__ import annotations

import threading
import time

import pytest

from keras_weightwatch.worker import Worker


def test_jobs_run_in_order_on_one_named_thread():
    seen: list[tuple[int, str]] = []
    worker = Worker(lambda job: seen.append((job, threading.current_thread().name)), maxsize=2)
    for i in range(20):
        worker.submit(i)
    worker.close()
    assert [job for job, _ in seen] == list(range(20))
    assert {name for _, name in seen} == {"weightwatch"}
    assert threading.current_thread().name != "weightwatch"


def test_errors_are_kept_in_order_and_the_worker_goes_on():
    done = []

    def handle(job):
        if job % 3 == 0:
            raise RuntimeError(f"job {job}")
        done.append(job)

    worker = Worker(handle)
    for i in range(7):
        worker.submit(i)
    worker.join()
    assert [str(e) for e in worker.pop_errors()] == ["job 0", "job 3", "job 6"]
    assert worker.pop_errors() == []  # popped once
    assert done == [1, 2, 4, 5]
    worker.close()


@pytest.mark.parametrize("maxsize", [1, 3])
def test_submit_waits_while_the_queue_is_full(maxsize):
    gate = threading.Event()
    worker = Worker(lambda job: gate.wait(timeout=30), maxsize=maxsize)
    submitted = []

    def producer():
        for i in range(maxsize + 3):
            worker.submit(i)
            submitted.append(i)

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(0.5)
    # One job is being handled, `maxsize` wait in the queue; the next submit blocks.
    assert submitted == list(range(maxsize + 1))
    gate.set()
    t.join(timeout=30)
    assert submitted == list(range(maxsize + 3))
    worker.close()


def test_close_finishes_every_queued_job_and_is_safe_twice():
    done = []

    def slow(job):
        time.sleep(0.02)
        done.append(job)

    worker = Worker(slow, maxsize=10)
    for i in range(10):
        worker.submit(i)
    worker.close()
    assert done == list(range(10))
    assert not worker.alive
    worker.close()
    with pytest.raises(RuntimeError, match="worker thread has stopped"):
        worker.submit(1)


def test_bad_maxsize():
    with pytest.raises(ValueError, match="Received: maxsize=0"):
        Worker(lambda job: None, maxsize=0)
