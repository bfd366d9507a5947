"""In-flight micro-batches per chunk, checked against an independent re-derivation of the
order in which megatron-core's 1F1B and interleaved 1F1B schedules run forwards and
backwards on one pipeline rank (``forward_backward_pipelining_without_interleaving`` and
``forward_backward_pipelining_with_interleaving`` in
``megatron/core/pipeline_parallel/schedules.py``), and against Megatron's own functions."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest

from uniap_megatron.cost.schedule import inflight_points, schedule_table, warmup_microbatches

# (pp, vpp, M) with M a multiple of pp whenever vpp > 1, as Megatron requires.
CASES = [
    (1, 1, 1), (1, 1, 8), (2, 1, 1), (2, 1, 8), (4, 1, 3), (4, 1, 16), (8, 1, 64),
    (2, 2, 2), (2, 2, 4), (2, 3, 8), (4, 2, 4), (4, 2, 8), (4, 5, 16), (4, 5, 32),
    (8, 2, 8), (8, 3, 24), (3, 4, 9), (16, 2, 32),
]


def virtual_microbatch(k: int, pp: int, vpp: int) -> tuple[int, int]:
    """(micro-batch, chunk) of the k-th forward of a rank, in closed form.

    Megatron groups micro-batches pp at a time and runs each group through chunk 0, then
    chunk 1, ...; every block of pp x vpp forwards is one group through all chunks."""
    block, offset = divmod(k, pp * vpp)
    chunk, index = divmod(offset, pp)
    return block * pp + index, chunk


def rank_order(pp: int, vpp: int, rank: int, m: int) -> list[tuple[str, int, int]]:
    """The (F|B, micro-batch, chunk) sequence one rank runs.

    Warm-up forwards: pp - rank - 1 without interleaving; with it, every rank first fills
    all but its last chunk for one group ((vpp - 1) x pp) plus two per later rank
    (2 x (pp - rank - 1)). Then one forward and one backward alternate, and the remaining
    backwards drain. The k-th backward belongs to the k-th forward's micro-batch, on the
    mirrored chunk (vpp - 1 - chunk): backwards walk the chunks in reverse. With pp = 1
    each micro-batch runs forward and backward in turn."""
    total = m * vpp
    if pp == 1:
        warmup = 0
    elif vpp == 1:
        warmup = pp - rank - 1
    else:
        warmup = 2 * (pp - rank - 1) + (vpp - 1) * pp
    warmup = min(warmup, total)
    forwards = [virtual_microbatch(k, pp, vpp) if vpp > 1 else (k, 0) for k in range(total)]
    backwards = [(mb, vpp - 1 - chunk) for mb, chunk in forwards]
    order = [("F", *forwards[k]) for k in range(warmup)]
    for k in range(total - warmup):
        order += [("F", *forwards[warmup + k]), ("B", *backwards[k])]
    order += [("B", *backwards[k]) for k in range(total - warmup, total)]
    return order


def peak_counts(order: list[tuple[str, int, int]], vpp: int) -> set[tuple[int, ...]]:
    """Per-chunk counts of live micro-batches right after every forward (where memory
    peaks), checking that the order is a valid schedule: every micro-batch of every chunk
    runs forward once, then backward once, and a chunk's backward follows the next
    chunk's backward of the same micro-batch."""
    live: set[tuple[int, int]] = set()
    done_bwd: set[tuple[int, int]] = set()
    points = set()
    for op, mb, chunk in order:
        key = (mb, chunk)
        if op == "F":
            assert key not in live and key not in done_bwd
            assert chunk == 0 or (mb, chunk - 1) in live | done_bwd, "forward before the previous chunk"
            live.add(key)
            points.add(tuple(sum(1 for _, c in live if c == k) for k in range(vpp)))
        else:
            assert key in live, f"backward of {key} before its forward"
            assert chunk == vpp - 1 or (mb, chunk + 1) in done_bwd, "backward before the next chunk's"
            live.remove(key)
            done_bwd.add(key)
    assert not live
    return points


def maximal(points: set[tuple[int, ...]]) -> set[tuple[int, ...]]:
    return {p for p in points if not any(q != p and all(a >= b for a, b in zip(q, p)) for q in points)}


@pytest.mark.parametrize("pp, vpp, m", CASES)
def test_inflight_points_match_the_rederived_order(pp, vpp, m):
    for rank in range(pp):
        expected = maximal(peak_counts(rank_order(pp, vpp, rank, m), vpp))
        assert set(inflight_points(pp, vpp, rank, m)) == expected, (pp, vpp, m, rank)


@pytest.mark.parametrize("pp, vpp, m", CASES)
def test_peak_activation_memory_for_any_chunk_sizes(pp, vpp, m):
    """The quantity the planner uses: max over peak moments of sum_k count_k x bytes_k."""
    rng = random.Random(pp * 1000 + vpp * 100 + m)
    for rank in range(pp):
        points = peak_counts(rank_order(pp, vpp, rank, m), vpp)
        for _ in range(5):
            sizes = [rng.uniform(0.0, 10.0) for _ in range(vpp)]
            truth = max(sum(c * x for c, x in zip(p, sizes)) for p in points)
            ours = max(sum(c * x for c, x in zip(p, sizes)) for p in inflight_points(pp, vpp, rank, m))
            assert ours == pytest.approx(truth, rel=1e-12)


@pytest.mark.parametrize("pp, m", [(2, 8), (4, 16), (8, 64), (4, 3)])
def test_1f1b_rank_holds_pp_minus_rank(pp, m):
    for rank in range(pp):
        assert inflight_points(pp, 1, rank, m) == ((min(pp - rank, m),),)


@pytest.mark.parametrize("pp, vpp", [(2, 2), (4, 2), (4, 5), (8, 3)])
def test_interleaved_first_rank_total_is_warmup_plus_one(pp, vpp):
    # With enough micro-batches, rank 0 holds at most its warm-up plus one chunk
    # activations, 2 (pp - 1) + (vpp - 1) pp + 1: with equal chunks (1/vpp of its layers
    # each) that is pp (1 + (pp - 1) / (pp vpp)) rank-activations, Korthikanti et al.'s
    # interleaving factor.
    m = 4 * pp
    most = max(sum(p) for p in inflight_points(pp, vpp, 0, m))
    assert most == 2 * (pp - 1) + (vpp - 1) * pp + 1


@pytest.mark.megatron
@pytest.mark.parametrize("pp, vpp, m", [c for c in CASES if c[0] > 1])
def test_matches_megatron_schedule_functions(pp, vpp, m):
    """Megatron's own table and warm-up counts. ``get_pp_rank_microbatches`` reads the
    pipeline size and rank from its communicator; a plain object stands in for one."""
    from megatron.core.pipeline_parallel import schedules

    assert schedule_table(m, vpp, pp) == schedules.get_schedule_table(m, vpp, pp)
    for rank in range(pp):
        group = SimpleNamespace(size=lambda: pp, rank=lambda r=rank: r)
        comm = SimpleNamespace(pp_group=group, virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
        total, _, warmup, _ = schedules.get_pp_rank_microbatches(m, vpp, pp, p2p_communicator=comm)
        assert total == m * vpp
        assert warmup_microbatches(pp, vpp, rank, m) == warmup
        forwards = [(f[1], f[2]) for f in rank_order(pp, vpp, rank, m) if f[0] == "F"]
        expected = [tuple(x) for x in schedules.get_schedule_table(m, vpp, pp)] if vpp > 1 else [(k, 0) for k in range(m)]
        assert forwards == expected


def test_rederivation_closed_form_equals_grouped_table():
    for pp, vpp in itertools.product([2, 3, 4], [2, 3]):
        m = 3 * pp
        assert [virtual_microbatch(k, pp, vpp) for k in range(m * vpp)] == schedule_table(m, vpp, pp)
