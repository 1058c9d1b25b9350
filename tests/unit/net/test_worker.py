"""NsWorker: calls run on one thread, results and errors come back, close is idempotent."""

import threading

import pytest

from ipshift.net.errors import NetError
from ipshift.net.worker import NsWorker, WorkerClosedError


def test_calls_run_on_the_worker_thread():
    worker = NsWorker(None, name="t")
    try:
        here = threading.get_ident()
        there = worker.call(threading.get_ident)
        assert there != here
        assert worker.call(threading.get_ident) == there  # always the same thread
        assert worker.submit(lambda a, b=0: a + b, 2, b=3).result(timeout=5) == 5
        # reentrant: a call made on the worker runs inline instead of deadlocking
        assert worker.call(lambda: worker.call(lambda: 7)) == 7
    finally:
        worker.close()


def test_errors_are_raised_in_the_caller():
    with_worker = NsWorker(None)
    try:
        with pytest.raises(NetError, match="boom"):
            with_worker.call(lambda: (_ for _ in ()).throw(NetError("boom")))
        assert with_worker.call(lambda: 1) == 1  # still alive
    finally:
        with_worker.close()


def test_close_is_idempotent_and_refuses_new_work():
    worker = NsWorker(None)
    worker.close()
    worker.close()
    assert worker.closed
    with pytest.raises(WorkerClosedError):
        worker.call(lambda: 1)


def test_missing_namespace_fails_in_the_constructor():
    with pytest.raises(OSError):
        NsWorker("ipsh-no-such-namespace-here")
