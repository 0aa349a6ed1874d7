"""Deadlines that hold while code is running, not only between steps.

A template looping over a sender's lists, a connector stuck in a loop or a ``time.sleep``,
a receiver dripping its answer a byte at a time: none of them returns to the hub by itself
in time. One shared watchdog thread keeps every armed deadline in a heap and, when one
passes while its block is still running, acts on it:

- ``interrupting(deadline)`` raises ``DeadlineExceeded`` inside the thread that armed it
  (``PyThreadState_SetAsyncExc``), at its next Python instruction; it is raised again every
  ``REFIRE`` seconds in case the code swallowed it;
- ``call_before(deadline, fn)`` runs ``fn`` on a helper thread under ``interrupting`` and
  stops waiting for it at the deadline, so even code blocked in C (a sleep) cannot hold
  the caller past it;
- ``calling_at(deadline, callback)`` calls ``callback`` (hub.http shuts a socket down).

A fired action can never land after its block has left: the block's exit and the firing
take the same lock, and the exit clears an interrupt that was raised but not yet delivered.

An interrupt lands at whatever instruction the thread is at; in library code that could be
between a lock's ``acquire()`` and its ``try``, leaking the lock. Template rendering runs
no such code, but a connector calls anything: ``interrupting(..., only_in=file)`` fires
only while the thread is suspended in that file's code (the connector's own module), and
looks again shortly otherwise. A thread held by a GIL switch resumes, and takes a pending
interrupt, exactly where the watchdog saw it.
"""

from __future__ import annotations

import contextvars
import ctypes
import heapq
import itertools
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

__all__ = ["DeadlineExceeded", "call_before", "calling_at", "interrupting"]

REFIRE = 0.2  # seconds between repeated interrupts of code that swallowed the first
RELOOK = 0.01  # seconds until another look at a thread that was not in the code to interrupt
JOIN_GRACE = 0.05  # seconds call_before waits past the deadline for an interrupted thread

T = TypeVar("T")
log = logging.getLogger("hub.deadline")


class DeadlineExceeded(BaseException):
    """The deadline passed while the code was running.

    A BaseException, like KeyboardInterrupt, so that a connector's or a library's
    ``except Exception`` does not swallow it.
    """


class _Alarm:
    """One armed deadline: ``fire`` runs on the watchdog thread unless ``done`` is set."""

    __slots__ = ("lock", "done", "fired", "action")

    def __init__(self, action: Callable[[_Alarm], float | None]):
        self.lock = threading.Lock()
        self.done = False
        self.fired = False
        self.action = action  # returns seconds until it should fire again, or None

    def fire(self) -> float | None:
        with self.lock:
            if self.done:
                return None
            self.fired = True
            return self.action(self)


class _Watchdog:
    """The one thread per process that fires alarms; started on first use (and again in a
    forked child, where the parent's thread does not exist)."""

    def __init__(self) -> None:
        self._order = itertools.count()
        self._reset()

    def _reset(self) -> None:
        """A fresh start (in a forked child: a lock the parent held would never free)."""
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Alarm]] = []
        self._started = False
        # When the thread, waiting, wakes by itself next (-inf: it is not waiting, and looks
        # at the heap before it does), and the earliest time an arm asked it to look again
        # (kept even once that alarm has finished and left the heap).
        self._wake_at = -math.inf
        self._due = math.inf

    def arm(self, when: float, alarm: _Alarm) -> None:
        """Fire ``alarm`` at ``when``. The thread is woken only for an alarm due before it
        wakes by itself: woken at every arm that came first in the heap, it dropped the
        finished alarms there, so the next arm came first again, and a quick delivery's
        deadlines woke it each time (a sixth of an http delivery's CPU)."""
        with self._cond:
            if not self._started:
                self._started = True
                thread = threading.Thread(target=self._loop, name="hub-watchdog", daemon=True)
                thread.start()
            self._drop_finished()  # the heap stays as small as when the thread dropped them
            heapq.heappush(self._heap, (when, next(self._order), alarm))
            if when < self._wake_at:
                self._wake_at = self._due = when
                self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    self._drop_finished()
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        _, _, alarm = heapq.heappop(self._heap)
                        break
                    if self._due <= now:
                        self._due = math.inf
                    # Woken for an alarm that has finished since, it still waits until
                    # that one's time: an alarm armed meanwhile for later needs no wake.
                    self._wake_at = min(self._heap[0][0] if self._heap else math.inf, self._due)
                    self._cond.wait(None if self._wake_at == math.inf else self._wake_at - now)
                    self._wake_at = -math.inf
            try:  # outside the heap lock: an action may take a moment
                again = alarm.fire()
            except Exception as exc:  # the watchdog must outlive any one action
                log.error("deadline action failed: %s", type(exc).__name__)
                again = None
            if again is not None:
                self.arm(time.monotonic() + again, alarm)

    def _drop_finished(self) -> None:
        while self._heap and self._heap[0][2].done:
            heapq.heappop(self._heap)


_watchdog = _Watchdog()
os.register_at_fork(after_in_child=_watchdog._reset)


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None
    )


@contextmanager
def calling_at(deadline: float | None, callback: Callable[[], None]) -> Iterator[None]:
    """Call ``callback`` once from the watchdog thread if the block is still running at
    ``deadline`` (a ``time.monotonic()`` time); never after the block has left."""
    if deadline is None:
        yield
        return

    def act(alarm: _Alarm) -> None:
        callback()

    alarm = _Alarm(act)
    try:
        _watchdog.arm(deadline, alarm)
        yield
    finally:
        with alarm.lock:
            alarm.done = True


@contextmanager
def interrupting(deadline: float | None, only_in: str | None = None) -> Iterator[None]:
    """Raise DeadlineExceeded in this thread if the block is still running at ``deadline``.

    Python code is interrupted at its next instruction; code blocked in C (a socket read,
    a sleep) is interrupted when it returns to Python. With ``only_in`` (a code file name),
    only while the thread runs code of that file. The block's exit is safe against a late
    interrupt: it either surfaces as DeadlineExceeded from the ``with`` statement or is
    cleared before the block is left.
    """
    if deadline is None:
        yield
        return
    thread_id = threading.get_ident()

    def act(alarm: _Alarm) -> float:
        if only_in is not None:
            frame = sys._current_frames().get(thread_id)
            if frame is None or frame.f_code.co_filename != only_in:
                return RELOOK
        _set_async_exc(thread_id, DeadlineExceeded)
        return REFIRE

    alarm = _Alarm(act)
    late = False
    try:
        # Armed inside the try: a deadline already past fires at once, and the exit
        # below must still see it.
        _watchdog.arm(deadline, alarm)
        yield
    finally:
        while True:
            try:
                with alarm.lock:
                    alarm.done = True
                    _set_async_exc(thread_id, None)  # one raised but not yet delivered
                break
            except DeadlineExceeded:  # delivered while leaving: it still counts
                late = True
    if late:
        raise DeadlineExceeded


class _Job:
    __slots__ = ("fn", "args", "context", "deadline", "only_in", "done", "value", "error")

    def __init__(self, fn, args, deadline, only_in) -> None:
        self.fn, self.args, self.deadline, self.only_in = fn, args, deadline, only_in
        self.context = contextvars.copy_context()  # the caller's context variables
        # Held until the job ends: the helper's release wakes the caller in C, where an
        # Event's set() ran a Condition's notify_all in Python (7 % of an http delivery).
        self.done = threading.Lock()
        self.done.acquire()
        self.value: Any = None
        self.error: BaseException | None = None


class _Helper:
    """A thread that runs jobs for call_before, one at a time, and waits idle in between
    (a new thread per step costs more than the rest of call_before together)."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="hub-step", daemon=True).start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                with interrupting(job.deadline, job.only_in):
                    job.value = job.context.run(job.fn, *job.args)
            except BaseException as exc:  # handed to the caller, never lost in this thread
                job.error = exc
            job.done.release()
            with _idle_lock:
                if len(_idle) >= MAX_IDLE_HELPERS:
                    return
                _idle.append(self)


MAX_IDLE_HELPERS = 16
_idle: list[_Helper] = []
_idle_lock = threading.Lock()


def _forget_helpers() -> None:
    global _idle_lock
    _idle.clear()  # their threads did not survive the fork
    _idle_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_helpers)


def call_before(
    deadline: float | None, fn: Callable[..., T], *args: Any, interrupt_in: str | None = None
) -> T:
    """``fn(*args)``, or DeadlineExceeded once ``deadline`` has passed.

    ``fn`` runs on a helper thread (with the caller's context variables) that is interrupted
    at the deadline while it runs code of the file ``interrupt_in`` (``fn``'s own by
    default); the caller stops waiting for it then, whatever it is doing. A helper busy
    elsewhere (a sleep, a library) is left to finish, and then waits for the next call.
    """
    if deadline is None:
        return fn(*args)
    code = getattr(fn, "__code__", None)
    job = _Job(fn, args, deadline, interrupt_in or (code.co_filename if code else None))
    with _idle_lock:
        helper = _idle.pop() if _idle else None
    (helper or _Helper()).jobs.put(job)
    if not job.done.acquire(timeout=max(0.0, deadline - time.monotonic()) + JOIN_GRACE):
        raise DeadlineExceeded  # the helper goes on alone, and back to the pool when done
    if job.error is not None:
        raise job.error
    return job.value
