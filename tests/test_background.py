"""The helper process the search hands work to: results in order, errors passed on, and
a lost helper's work redone in place."""

from __future__ import annotations

import dataclasses
import math

import pytest

from conftest import request
from uniap_megatron.solver import background
from uniap_megatron.solver.background import Helper, Shared, Simulations, simulated_step
from uniap_megatron.solver.search import search


def _square(x):
    return x * x


def test_jobs_come_back_in_order_and_errors_with_them():
    helper = Helper({"square": _square})
    try:
        assert helper.available
        tickets = [helper.send("square", x) for x in (3, 4, "a")]
        assert helper.backlog == 3
        assert helper.take(tickets[1]) == (True, 16)
        assert helper.take(tickets[0]) == (True, 9)
        ok, err = helper.take(tickets[2])
        assert not ok and isinstance(err, TypeError)
        assert helper.backlog == 0
    finally:
        helper.close()


def _estimate():
    req = request("model=llama3_70b", "cluster.num_nodes=8", "train.global_batch_size=128")
    return search(req.model, req.cluster, req.train, req.pins).best.estimate


def test_a_lost_helper_leaves_its_work_to_this_process(monkeypatch):
    monkeypatch.setattr(background, "HELPER_OPS", 0)  # every schedule goes to the helper
    estimate = _estimate()
    helper = Helper({"simulate": simulated_step, "square": _square})
    results = {}
    sims = Simulations(helper, results.__setitem__)
    shared = Shared(helper, "square", _square)
    try:
        assert helper.available
        helper.send("square", 2)  # busy: the batch below is computed here
        assert shared.map([1, 2, 3, 4]) == [1, 4, 9, 16]
        helper.take(0)
        helper.process.kill()
        helper.process.join()
        sims.submit(0, estimate)
        sims.settle()
        assert math.isclose(results[0], simulated_step(estimate), rel_tol=0, abs_tol=0)
        assert not helper.available
        assert shared.map([5, 6]) == [25, 36]
    finally:
        helper.close()


def test_disabled_helper_never_forks():
    helper = Helper({"square": _square}, enabled=False)
    assert not helper.available and helper.conn is None
    assert Shared(helper, "square", _square).map([2, 3]) == [4, 9]


@pytest.mark.parametrize("workers", [1, 2])
def test_errors_reach_the_caller_from_either_process(workers, monkeypatch):
    monkeypatch.setattr(background, "HELPER_OPS", 0)
    broken = dataclasses.replace(_estimate(), num_microbatches=0)  # a schedule with no passes
    helper = Helper({"simulate": simulated_step}, enabled=workers > 1)
    sims = Simulations(helper, lambda key, value: None)
    try:
        with pytest.raises(Exception) as raised:
            sims.submit(0, broken)
            sims.settle()
        assert type(raised.value).__name__ == type(_error_of(broken)).__name__
    finally:
        helper.close()


def _error_of(estimate):
    try:
        simulated_step(estimate)
    except Exception as err:
        return err
    raise AssertionError("the broken estimate simulates")
