"""Requests as rows of the engine's batch: each runs in its own thread inside ``engine.member()``, so the
forwards of every request in flight run as rows of one padded forward per tick (``kvmas.agents.engine``).

A bounded queue holds what waits for a slot (``max_batch`` run at once); a full queue refuses at once
(:class:`QueueFull`, an HTTP 429). When the server is idle, the first request waits ``collect_s`` for others,
and requests started together join the batch together, so a burst's prefills meet in the same tick.
A job cancelled before it starts never runs; one cancelled while it runs stops at its next spoken token
(the run's listener raises :class:`Cancelled`).

>>> from kvmas.testing import tiny_model
>>> from kvmas.primitives import Single
>>> m = tiny_model()
>>> sched = Scheduler(m.engine, max_batch=4)
>>> jobs = [sched.submit(lambda q=q: Single(max_new_tokens=3)(q, model=m).answer) for q in ("2+2?", "3+4?")]
>>> [j.result() for j in jobs] == [Single(max_new_tokens=3)(q, model=m).answer for q in ("2+2?", "3+4?")]
True
>>> sched.close()
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

from kvmas.errors import KvmasError


class QueueFull(KvmasError):
    """Every slot busy and the queue full: the client should retry later (HTTP 429)."""


class Cancelled(KvmasError):
    """The client went away; the run was stopped."""


class Job:
    """One submitted request: ``result()`` waits for it, ``cancel()`` stops it, ``check()`` (called from the
    run's listener) raises :class:`Cancelled` once it is cancelled."""

    def __init__(self, fn: Callable[[], Any], then: Callable[[Any], Any] | None = None):
        self.fn, self.then = fn, then
        self.future: Future = Future()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        if self._cancelled.is_set():
            raise Cancelled("request cancelled by the client")

    def result(self, timeout: float | None = None) -> Any:
        return self.future.result(timeout)


class Scheduler:
    """``max_batch`` jobs run at once as rows of ``engine``'s batch; up to ``max_queue`` more wait."""

    def __init__(self, engine, *, max_batch: int = 32, max_queue: int = 64, collect_s: float = 0.005):
        if max_batch < 1 or max_queue < 0:
            raise KvmasError(f"max_batch must be >= 1 and max_queue >= 0 (got {max_batch}, {max_queue})")
        self.engine, self.max_batch, self.max_queue, self.collect_s = engine, max_batch, max_queue, collect_s
        self._queue: deque[Job] = deque()
        self._running = 0
        self._closed = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._dispatch, name="kvmas-dispatch", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def submit(self, fn: Callable[[], Any], then: Callable[[Any], Any] | None = None) -> Job:
        """Queue ``fn`` (one whole run); ``then(result)`` runs after it has left the batch (work that runs no
        forward, such as writing the trace, must not hold the other rows' tick). :class:`QueueFull` when no
        slot is free and the queue is full."""
        job = Job(fn, then)
        with self._cv:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if self._running + len(self._queue) >= self.max_batch + self.max_queue:
                raise QueueFull(f"server busy: {self._running} requests running and {len(self._queue)} queued "
                                f"(limits {self.max_batch} + {self.max_queue}); retry later")
            self._queue.append(job)
            self._cv.notify_all()
        return job

    def close(self) -> None:
        """Stop dispatching; queued jobs are cancelled, running ones finish."""
        with self._cv:
            self._closed = True
            for job in self._queue:
                job.cancel()
                job.future.set_exception(Cancelled("server shut down"))
            self._queue.clear()
            self._cv.notify_all()
        self._thread.join(timeout=5)

    def _dispatch(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (not self._queue or self._running >= self.max_batch):
                    self._cv.wait()
                if self._closed:
                    return
                if self._running == 0 and self.collect_s > 0:  # idle: let a burst gather
                    self._cv.wait_for(lambda: self._closed or len(self._queue) >= self.max_batch, self.collect_s)
                    if self._closed:
                        return
                take = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch - self._running))]
                take = [j for j in take if not self._skip(j)]
                self._running += len(take)
            if take:
                start = threading.Barrier(len(take))
                for job in take:
                    threading.Thread(target=self._work, args=(job, start), name="kvmas-request", daemon=True).start()

    @staticmethod
    def _skip(job: Job) -> bool:
        if job.cancelled:
            job.future.set_exception(Cancelled("request cancelled before it started"))
            return True
        return False

    def _work(self, job: Job, start: threading.Barrier) -> None:
        try:
            with self.engine.member():
                try:  # every job of a group is a member before any of them runs its first forward
                    start.wait(timeout=1.0)
                except threading.BrokenBarrierError:
                    pass
                result = job.fn()
            if job.then is not None:
                job.then(result)
            job.future.set_result(result)
        except BaseException as exc:  # the waiting request gets the error; the slot is freed either way
            job.future.set_exception(exc)
        finally:
            with self._cv:
                self._running -= 1
                self._cv.notify_all()
