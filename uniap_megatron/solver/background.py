"""Work the search hands to a second core: simulations of the plans it has solved.

A forked helper process simulates each solved plan while the search goes on solving the
next strategies. The search reads a simulated step only at fixed points of its own
progress (:class:`Simulations`), never as soon as it happens to arrive, so the plan is
the same with or without the helper, on one core or many.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from uniap_megatron.cost.simulate import simulate_estimate
from uniap_megatron.cost.step import Estimate

HELPER_OPS = 4096
"""Schedules of fewer passes (pp * vpp * micro-batches) are simulated in place: a fork
costs more than simulating them."""


def forkable() -> bool:
    """Whether this process may fork workers: the fork start method exists, no other
    Python thread holds locks a child would inherit, and this is not a daemonic process
    (a multiprocessing.Pool's worker, which may not have children)."""
    return ("fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1
            and not multiprocessing.current_process().daemon)


def _simulated_step(estimate: Estimate) -> float:
    return simulate_estimate(estimate, record=False).step_time_s


def _serve(conn: Connection) -> None:
    """The helper's loop: an estimate in, its simulated step (or the error) out."""
    while True:
        estimate = conn.recv()
        if estimate is None:
            return
        try:
            conn.send((True, _simulated_step(estimate)))
        except Exception as err:  # the search re-raises it as its own
            conn.send((False, err))


class Simulations:
    """Simulated steps of solved plans, settled in submission order.

    ``submit`` starts a simulation; ``settle`` waits for the simulations submitted so far
    (all, or all but the latest few) and hands each result to ``on_result`` in order.
    Between the two the search must not read them: that keeps its course independent of
    timing."""

    def __init__(self, on_result: Callable[[int, float], None], *, use_helper: bool = True):
        self.on_result = on_result
        self.use_helper = use_helper
        self.pending: list[tuple[int, Estimate | float]] = []
        self.conn: Connection | None = None
        self.process: multiprocessing.process.BaseProcess | None = None
        self.in_helper = 0
        """How many of ``pending`` (the oldest ones) the helper is working on."""

    def submit(self, key: int, estimate: Estimate) -> None:
        pp = len(estimate.ranks)
        vpp = len(estimate.stages) // pp
        if pp > 1 and pp * vpp * estimate.num_microbatches >= HELPER_OPS and self._helper():
            self.conn.send(estimate)
            self.pending.append((key, estimate))
            self.in_helper += 1
        else:
            self.pending.append((key, _simulated_step(estimate)))

    def settle(self, keep: int = 0) -> None:
        """Read the results of all but the ``keep`` latest simulations."""
        done, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        for key, item in done:
            if isinstance(item, float):
                self.on_result(key, item)
                continue
            ok, value = self.conn.recv()
            self.in_helper -= 1
            if not ok:
                self.close()
                raise value
            self.on_result(key, value)

    def _helper(self) -> bool:
        if self.conn is not None:
            return True
        if not (self.use_helper and forkable()):
            return False
        parent, child = multiprocessing.get_context("fork").Pipe()
        self.process = multiprocessing.get_context("fork").Process(target=_serve, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.conn = parent
        return True

    def close(self) -> None:
        """Stop the helper; results not settled yet are dropped."""
        if self.conn is None:
            return
        if self.in_helper:
            self.process.kill()  # an error or an interruption: its work is not wanted
        else:
            self.conn.send(None)
        self.process.join()
        self.conn.close()
        self.conn = self.process = None
        self.in_helper = 0
