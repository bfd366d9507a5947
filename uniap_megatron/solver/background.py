"""Work the search hands to a second core: pure functions of its state.

A forked helper process runs jobs in the order they are sent: simulations of the plans
the search has solved, the mixed integer programs of its layout problems, and a share of
the keys it refines. The search reads a simulation or a program only at fixed points of
its own progress (:class:`Deferred`), and a refined bound is the same number wherever it
is computed (:class:`Shared`), so the plan is the same with or without the helper, on one
core or many.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from uniap_megatron.cost.simulate import simulate_estimate
from uniap_megatron.cost.step import Estimate

HELPER_OPS = 4096
"""Schedules of fewer passes (pp * vpp * micro-batches) are simulated in place: they take
a few milliseconds, and a search that has only such schedules would not win back the fork."""


def forkable() -> bool:
    """Whether this process may fork workers: the fork start method exists, no other
    Python thread holds locks a child would inherit, and this is not a daemonic process
    (a multiprocessing.Pool's worker, which may not have children)."""
    return ("fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1
            and not multiprocessing.current_process().daemon)


def simulated_step(estimate: Estimate) -> float:
    return simulate_estimate(estimate, record=False).step_time_s


def _serve(conn: Connection, jobs: dict[str, Callable[[Any], Any]]) -> None:
    """The helper's loop: (job kind, argument) in, (ok, result or error) out. An
    interruption is the search's to handle (it stops the helper); a search that is gone
    ends the loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        kind, argument = message
        try:
            conn.send((True, jobs[kind](argument)))
        except Exception as err:  # the caller decides: re-raise, or compute it itself
            conn.send((False, err))


class Helper:
    """One forked process that runs ``jobs[kind](argument)`` in the order sent. It is
    forked on first use, from the state the caller has then (``jobs`` may be bound
    methods of it); ``available`` is False where this process may not fork."""

    def __init__(self, jobs: dict[str, Callable[[Any], Any]], *, enabled: bool = True):
        self.jobs, self.enabled = jobs, enabled
        self.conn: Connection | None = None
        self.process: multiprocessing.process.BaseProcess | None = None
        self.sent = self.received = 0
        self.results: dict[int, tuple[bool, Any]] = {}

    @property
    def available(self) -> bool:
        if self.conn is None and self.enabled and forkable():
            parent, child = multiprocessing.get_context("fork").Pipe()
            self.process = multiprocessing.get_context("fork").Process(
                target=_serve, args=(child, self.jobs), daemon=True)
            self.process.start()
            child.close()
            self.conn = parent
        self.enabled = self.conn is not None
        return self.enabled

    @property
    def backlog(self) -> int:
        """Jobs sent whose results have not come back."""
        return self.sent - self.received

    @property
    def idle(self) -> bool:
        """Whether the helper has finished every job sent (results back but not taken
        count as finished)."""
        if self.conn is None:
            return False
        try:
            while self.backlog and self.conn.poll():
                self._receive()
        except (EOFError, OSError):
            self.close()
            return False
        return not self.backlog

    def send(self, kind: str, argument: Any) -> int | None:
        """Queue a job; returns its ticket, or None when the helper is not there (any more)."""
        if self.conn is None:
            return None
        try:
            self.conn.send((kind, argument))
        except OSError:  # the helper was lost
            self.close()
            return None
        self.sent += 1
        return self.sent - 1

    def take(self, ticket: int) -> tuple[bool, Any]:
        """The job's (ok, result or error), waiting for it if need be; (False, the error)
        for every job still out when the helper is lost, whose work the caller redoes."""
        if self.conn is None:
            return False, EOFError("the helper process was lost")
        try:
            while ticket >= self.received:
                self._receive()
        except (EOFError, OSError) as err:
            self.close()
            return False, err
        return self.results.pop(ticket)

    def _receive(self) -> None:
        """Keep the next result that comes back (they come in the order sent)."""
        self.results[self.received] = self.conn.recv()
        self.received += 1

    def close(self) -> None:
        """Stop the helper; results not taken yet are lost."""
        if self.conn is None:
            return
        if self.backlog or not self.process.is_alive():
            self.process.kill()  # an error, an interruption or a lost helper: no more work
        else:
            self.conn.send(None)
        self.process.join()
        self.conn.close()
        self.conn = self.process = None
        self.enabled = False
        self.sent = self.received = 0
        self.results.clear()


class Deferred:
    """Results of a pure function, read in submission order.

    ``submit`` starts a job: in the helper when ``worth(argument)`` says it pays and the
    helper is there, else here at once. ``settle`` hands the results of all jobs but the
    latest ``keep`` to ``on_result`` in order. Between the two the caller must not read
    them: that keeps its course independent of where and how fast the jobs ran."""

    def __init__(self, helper: Helper, kind: str, compute: Callable[[Any], Any],
                 on_result: Callable[[Any, Any], None], worth: Callable[[Any], bool] = lambda argument: True):
        self.helper, self.kind, self.compute, self.on_result, self.worth = helper, kind, compute, on_result, worth
        self.pending: list[tuple[Any, int | None, Any]] = []
        """(key, helper ticket and the argument, or None and the result)."""

    def submit(self, key: Any, argument: Any) -> None:
        ticket = None
        if self.worth(argument) and self.helper.available:
            ticket = self.helper.send(self.kind, argument)
        if ticket is not None:
            self.pending.append((key, ticket, argument))
        else:
            self.pending.append((key, None, self.compute(argument)))

    def settle(self, keep: int = 0) -> None:
        """Read the results of all but the ``keep`` latest jobs."""
        done, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        for key, ticket, value in done:
            if ticket is not None:
                ok, result = self.helper.take(ticket)
                if not ok and not isinstance(result, (EOFError, OSError)):
                    raise result
                value = result if ok else self.compute(value)  # the helper was lost: redo it
            self.on_result(key, value)


def _long_schedule(estimate: Estimate) -> bool:
    pp = len(estimate.ranks)
    vpp = len(estimate.stages) // pp
    return pp > 1 and pp * vpp * estimate.num_microbatches >= HELPER_OPS


class Simulations(Deferred):
    """Simulated steps of solved plans (``on_result(key, step_s)``); long schedules go to
    the helper."""

    def __init__(self, helper: Helper, on_result: Callable[[Any, float], None]):
        super().__init__(helper, "simulate", simulated_step, on_result, _long_schedule)


class Shared:
    """A pure function of the search's state, evaluated over a batch of arguments by this
    process and, when it is idle, the helper together (the same numbers either way)."""

    def __init__(self, helper: Helper, kind: str, compute: Callable[[Any], Any]):
        self.helper, self.kind, self.compute = helper, kind, compute

    def map(self, arguments: list) -> list:
        half = len(arguments) // 2
        if not half or not self.helper.available or not self.helper.idle:
            return [self.compute(a) for a in arguments]
        tickets = [self.helper.send(self.kind, a) for a in arguments[half:]]
        mine = [self.compute(a) for a in arguments[:half]]
        theirs = []
        for argument, ticket in zip(arguments[half:], tickets):
            ok, value = self.helper.take(ticket) if ticket is not None else (False, None)
            theirs.append(value if ok else self.compute(argument))  # errors surface here
        return mine + theirs
