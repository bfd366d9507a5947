"""A discrete-event simulation of one iteration of Megatron's pipeline schedules.

Every pipeline rank runs the exact sequence of forward passes, backward passes and p2p
calls of megatron-core's ``forward_backward_pipelining_without_interleaving`` (1F1B) and
``forward_backward_pipelining_with_interleaving`` (``megatron/core/pipeline_parallel/
schedules.py``): warm-up forwards, steady one-forward-one-backward, cool-down backwards.
Each p2p call is a group of sends and receives; a message moves once both its sender and
its receiver have posted their calls and both ranks' communication streams have finished
their earlier calls (NCCL p2p is a rendezvous, and calls on one stream run in order). A
blocking call holds its rank until all its messages have arrived.

Interleaving runs as Megatron-LM and Megatron-Bridge configure it by default
(``overlap_p2p_comm``, with ``deallocate_pipeline_outputs``): the steady state posts its
calls asynchronously, waits for a received tensor only before the pass that needs it, and
for its own send right after posting it; warm-up and cool-down calls block. With
``overlap_p2p=False`` every call blocks (``batch_p2p_comm``, megatron-core's default
config), which is the schedule whose step time ``schedule.pipeline_time`` writes in closed
form.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import lru_cache

from uniap_megatron.cost.schedule import schedule_table
from uniap_megatron.cost.step import Estimate


@dataclass(frozen=True)
class Interval:
    rank: int
    start: float
    end: float
    kind: str
    """``forward``, ``backward``, ``send`` or ``recv`` (a message this rank takes part in)."""
    chunk: int = -1
    microbatch: int = -1


@dataclass(frozen=True)
class Timeline:
    pp: int
    vpp: int
    num_microbatches: int
    makespan_s: float
    """From the first forward to the last operation of any rank."""
    intervals: tuple[Interval, ...]

    def of_rank(self, rank: int, kinds: tuple[str, ...] = ("forward", "backward")) -> list[Interval]:
        return [i for i in self.intervals if i.rank == rank and i.kind in kinds]

    def busy_s(self, rank: int) -> float:
        return sum(i.end - i.start for i in self.of_rank(rank))

    def idle_s(self, rank: int) -> float:
        """Time the rank computes nothing: the bubble, and the p2p waits."""
        return self.makespan_s - self.busy_s(rank)


# ----------------------------------------------------------------------------- programs
COMPUTE, POST, WAIT = 0, 1, 2
SEND, RECV = 0, 1
FWD, BWD = 0, 1


class _Calls:
    """Every p2p call of the iteration, in flat lists indexed by call id. A call is one
    group of sends and receives; its messages run concurrently, a rank's calls in order.
    It holds the schedule only: each simulation keeps its own times."""

    def __init__(self) -> None:
        self.rank: list[int] = []
        self.ops: list[list[tuple[int, int, int]]] = []  # (SEND|RECV, FWD|BWD, peer)
        self.previous: list[int] = []
        self.following: list[int] = []
        self.messages: list[dict[tuple[int, int], int]] = []  # (op, kind) -> message id
        # messages
        self.sender: list[int] = []
        self.receiver: list[int] = []

    def add(self, rank: int, ops: list, previous: int) -> int:
        c = len(self.rank)
        self.rank.append(rank)
        self.ops.append(ops)
        self.previous.append(previous)
        self.following.append(-1)
        self.messages.append({})
        if previous >= 0:
            self.following[previous] = c
        return c

    def message(self, sender: int, receiver: int, kind: int) -> None:
        m = len(self.sender)
        self.sender.append(sender)
        self.receiver.append(receiver)
        self.messages[sender][(SEND, kind)] = m
        self.messages[receiver][(RECV, kind)] = m


class _Program:
    """The instructions of one rank, in the order Megatron issues them: ``(COMPUTE, F|B,
    chunk, micro-batch)``, ``(POST, call, blocking)``, ``(WAIT, call, op, kind)``."""

    def __init__(self, rank: int, pp: int, calls: _Calls):
        self.rank, self.pp, self.calls = rank, pp, calls
        self.next, self.prev = (rank + 1) % pp, (rank - 1) % pp
        self.instructions: list[tuple] = []
        self.waits = False
        self.last_call = -1

    def compute(self, kind: str, chunk: int, microbatch: int) -> None:
        self.instructions.append((COMPUTE, FWD if kind == "F" else BWD, chunk, microbatch))

    def call(self, *, send_f=False, send_b=False, recv_f=False, recv_b=False, blocking=True) -> int:
        """Post a p2p call; -1 when it has nothing to move."""
        ops = []
        if send_f:
            ops.append((SEND, FWD, self.next))
        if send_b:
            ops.append((SEND, BWD, self.prev))
        if recv_f:
            ops.append((RECV, FWD, self.prev))
        if recv_b:
            ops.append((RECV, BWD, self.next))
        if not ops:
            return -1
        c = self.calls.add(self.rank, ops, self.last_call)
        self.last_call = c
        self.instructions.append((POST, c, blocking))
        return c

    def wait(self, call: int, op: str, kind: str) -> None:
        if call >= 0:
            self.waits = True
            self.instructions.append((WAIT, call, SEND if op == "send" else RECV, FWD if kind == "F" else BWD))


def _one_f_one_b(prog: _Program, m: int) -> None:
    """``forward_backward_pipelining_without_interleaving``: every call blocks."""
    r, pp = prog.rank, prog.pp
    first, last = r == 0, r == pp - 1
    warmup = min(pp - r - 1, m)
    remaining = m - warmup
    for i in range(warmup):
        prog.call(recv_f=not first)
        prog.compute("F", 0, i)
        prog.call(send_f=not last)
    if remaining:
        prog.call(recv_f=not first)
    for i in range(remaining):
        prog.compute("F", 0, warmup + i)
        prog.call(send_f=not last, recv_b=not last)
        prog.compute("B", 0, i)
        if i == remaining - 1:
            prog.call(send_b=not first)
        else:
            prog.call(send_b=not first, recv_f=not first)
    for i in range(warmup):
        prog.call(recv_b=not last)
        prog.compute("B", 0, remaining + i)
        prog.call(send_b=not first)


class _Interleaving:
    """The tables and predicates of ``forward_backward_pipelining_with_interleaving`` for
    one rank; ``k`` counts this rank's forward (or backward) passes in order."""

    def __init__(self, pp: int, vpp: int, rank: int, m: int, group: int):
        self.pp, self.vpp, self.rank = pp, vpp, rank
        table = schedule_table(m, vpp, group)
        self.microbatch = [mb for mb, _ in table]
        self.fchunk = [c for _, c in table]
        self.bchunk = [vpp - 1 - c for _, c in table]
        self.total = m * vpp
        warmup = (pp - rank - 1) * 2 + (vpp - 1) * group
        self.all_warmup = warmup >= self.total
        self.warmup = min(warmup, self.total)

    def receives(self, k: int, forward: bool) -> bool:
        """``recv_tensor_from_previous_stage``: does the pass after pass ``k`` get its input
        from the neighbouring rank?"""
        leading = self.rank == 0 if forward else self.rank == self.pp - 1
        if not leading:
            return True
        if k < self.pp - 1:
            return False
        chunks, edge = (self.fchunk, self.vpp - 1) if forward else (self.bchunk, 0)
        return chunks[k - (self.pp - 1)] != edge

    def sends_forward(self, k: int) -> bool:
        return not (self.fchunk[k] == self.vpp - 1 and self.rank == self.pp - 1)

    def sends_backward(self, k: int) -> bool:
        return not (self.bchunk[k] == 0 and self.rank == 0)


def _interleaved(prog: _Program, vpp: int, m: int, overlap: bool) -> None:
    r, pp = prog.rank, prog.pp
    s = _Interleaving(pp, vpp, r, m, group=pp)
    warmup, total = s.warmup, s.total
    remaining = total - warmup
    prog.call(recv_f=r != 0)
    recv_next_handles: deque[int] = deque()
    for k in range(warmup):
        prog.compute("F", s.fchunk[k], s.microbatch[k])
        recv_prev = s.receives(k, True) and k != total - 1
        if k == warmup - 1 and not s.all_warmup and not overlap:
            prog.call(send_f=s.sends_forward(k), recv_f=recv_prev, recv_b=r != pp - 1)
        else:
            prog.call(send_f=s.sends_forward(k), recv_f=recv_prev)
        if overlap and k == warmup - 1 and not s.all_warmup and r != pp - 1:
            recv_next_handles.append(prog.call(recv_b=True, blocking=False))
    recv_prev_handles: deque[int] = deque()
    send_prev = -1
    for k in range(remaining):
        fk = k + warmup
        recv_prev = s.receives(fk, True) and k != remaining - 1
        recv_next = s.receives(k, False)
        if not overlap:
            prog.compute("F", s.fchunk[fk], s.microbatch[fk])
            prog.compute("B", s.bchunk[k], s.microbatch[k])
            prog.call(send_f=s.sends_forward(fk), send_b=s.sends_backward(k), recv_f=recv_prev, recv_b=recv_next)
            continue
        if not (s.fchunk[fk] == 0 and r == 0) and recv_prev_handles:
            prog.wait(recv_prev_handles.popleft(), "recv", "F")
        prog.compute("F", s.fchunk[fk], s.microbatch[fk])
        sending = s.sends_forward(fk)
        c = prog.call(send_f=sending, recv_f=recv_prev, blocking=False)
        if recv_prev:
            recv_prev_handles.append(c)
        if sending:  # deallocate_pipeline_outputs: the output is freed once sent
            prog.wait(c, "send", "F")
        if not (s.bchunk[k] == vpp - 1 and r == pp - 1) and recv_next_handles:
            prog.wait(recv_next_handles.popleft(), "recv", "B")
        prog.compute("B", s.bchunk[k], s.microbatch[k])
        sending = s.sends_backward(k)
        c = prog.call(send_b=sending, recv_b=recv_next, blocking=False)
        prog.wait(send_prev, "send", "B")
        send_prev = c if sending else -1
        if recv_next:
            recv_next_handles.append(c)
    if s.all_warmup:
        prog.call(recv_b=r != pp - 1)
    for k in range(remaining, total):
        if not (s.bchunk[k] == vpp - 1 and r == pp - 1) and k != 0 and recv_next_handles:
            prog.wait(recv_next_handles.popleft(), "recv", "B")
        prog.compute("B", s.bchunk[k], s.microbatch[k])
        recv_next = s.receives(k, False) and k != total - 1
        prog.call(send_b=s.sends_backward(k), recv_b=recv_next)
    prog.wait(send_prev, "send", "B")


def programs(pp: int, vpp: int, m: int, *, overlap_p2p: bool) -> tuple[list[_Program], _Calls]:
    calls = _Calls()
    progs = [_Program(r, pp, calls) for r in range(pp)]
    for prog in progs:
        if pp == 1:
            for i in range(m):
                prog.compute("F", 0, i)
                prog.compute("B", 0, i)
        elif vpp == 1:
            _one_f_one_b(prog, m)
        else:
            _interleaved(prog, vpp, m, overlap_p2p)
    _match(calls)
    return progs, calls


@dataclass(frozen=True)
class _Compiled:
    """A schedule ready to run: per rank its instructions with messages resolved
    (``(COMPUTE, F|B, chunk, micro-batch)``, ``(POST, call, blocking)``, ``(WAIT,
    message)``), per call its rank, its neighbours on the rank and its messages."""

    code: tuple[tuple[tuple, ...], ...]
    rank: tuple[int, ...]
    previous: tuple[int, ...]
    following: tuple[int, ...]
    messages: tuple[tuple[int, ...], ...]
    sender: tuple[int, ...]
    receiver: tuple[int, ...]


@lru_cache(maxsize=16)
def _compiled(pp: int, vpp: int, m: int, overlap_p2p: bool) -> _Compiled:
    """:func:`programs`, built once per schedule shape: the search simulates many plans of
    the same shape, and building the schedule costs as much as running it."""
    progs, calls = programs(pp, vpp, m, overlap_p2p=overlap_p2p)
    messages = calls.messages
    code = tuple(
        tuple([(WAIT, messages[ins[1]][ins[2], ins[3]]) if ins[0] == WAIT else ins for ins in prog.instructions])
        if prog.waits else tuple(prog.instructions)
        for prog in progs
    )
    return _Compiled(code, tuple(calls.rank), tuple(calls.previous), tuple(calls.following),
                     tuple(map(tuple, map(dict.values, messages))), tuple(calls.sender), tuple(calls.receiver))


def _match(calls: _Calls) -> None:
    """Pair the n-th send of each (sender, receiver, kind) with the n-th receive."""
    sends: dict[tuple[int, int, int], list[int]] = {}
    recvs: dict[tuple[int, int, int], list[int]] = {}
    for c, (rank, ops) in enumerate(zip(calls.rank, calls.ops)):
        for op, kind, peer in ops:
            if op == SEND:
                sends.setdefault((rank, peer, kind), []).append(c)
            else:
                recvs.setdefault((peer, rank, kind), []).append(c)
    assert sends.keys() == recvs.keys(), "every channel needs senders and receivers"
    for key, senders in sends.items():
        receivers = recvs[key]
        assert len(senders) == len(receivers), f"unmatched p2p on {key}: {len(senders)} sends, {len(receivers)} receives"
        for sc, rc in zip(senders, receivers):
            calls.message(sc, rc, key[2])


# ----------------------------------------------------------------------------- execution
def simulate_pipeline(
    fwd: list[list[float]],
    bwd: list[list[float]],
    num_microbatches: int,
    p2p_s: float,
    *,
    overlap_p2p: bool | None = None,
    record: bool = True,
) -> Timeline:
    """Simulate one iteration. ``fwd[r][k]`` and ``bwd[r][k]`` are the forward and backward
    (with recomputation) times of chunk ``k`` of rank ``r`` for one micro-batch; ``p2p_s``
    is one message between neighbouring stages. ``overlap_p2p`` defaults to Megatron-LM's
    choice: on with interleaving. ``record=False`` keeps only the makespan (faster)."""
    pp, vpp = len(fwd), len(fwd[0])
    overlap = vpp > 1 if overlap_p2p is None else overlap_p2p
    schedule = _compiled(pp, vpp, num_microbatches, overlap)
    code, rank_of, previous, following = schedule.code, schedule.rank, schedule.previous, schedule.following
    messages, sender, receiver = schedule.messages, schedule.sender, schedule.receiver
    clock = [0.0] * pp
    pc = [0] * pp
    # Ranks that may move on; each at most once in the queue. Every time is a function of
    # the times it depends on, so the order in which ranks move changes none of them.
    ready = deque(range(pp))
    queued = [True] * pp
    intervals: list[Interval] = []
    # The schedule is shared between simulations (cached); the times are this run's.
    start: list[float | None] = [None] * len(rank_of)
    end: list[float | None] = [None] * len(rank_of)
    post: list[float | None] = [None] * len(rank_of)
    msg_start: list[float | None] = [None] * len(sender)
    msg_end: list[float | None] = [None] * len(sender)

    def wake(rank: int) -> None:
        if not queued[rank]:
            queued[rank] = True
            ready.append(rank)

    # A call starts once posted and once its rank's previous call has ended; a message
    # moves once both its calls have started; a call ends with its last message.
    def try_start(c: int) -> None:
        # A worklist rather than recursion: a closure that calls itself is a reference
        # cycle, which would keep this run's arrays alive until the collector runs.
        todo = [c]
        while todo:
            c = todo.pop()
            if c < 0 or start[c] is not None or post[c] is None:
                continue
            prev = previous[c]
            if prev >= 0 and end[prev] is None:
                continue
            start[c] = post[c] if prev < 0 else max(post[c], end[prev])
            ended = [c]
            for m in messages[c]:
                s, r = sender[m], receiver[m]
                if msg_start[m] is None and start[s] is not None and start[r] is not None:
                    msg_start[m] = max(start[s], start[r])
                    msg_end[m] = msg_start[m] + p2p_s
                    wake(rank_of[s])
                    wake(rank_of[r])
                    ended.append(r if s == c else s)
            for x in ended:  # a call that ended lets its rank's next call start
                if end[x] is None:
                    arrived = [msg_end[m] for m in messages[x]]
                    if None not in arrived:
                        end[x] = max([start[x]] + arrived)
                        wake(rank_of[x])
                        todo.append(following[x])

    def advance(r: int) -> None:
        """Run rank ``r`` until it must wait for a message."""
        instructions = code[r]
        durations = (fwd[r], bwd[r])
        t = clock[r]
        i = pc[r]
        n = len(instructions)
        while i < n:
            ins = instructions[i]
            op = ins[0]
            if op == COMPUTE:
                duration = durations[ins[1]][ins[2]]
                if record:
                    kind = "forward" if ins[1] == FWD else "backward"
                    intervals.append(Interval(r, t, t + duration, kind, ins[2], ins[3]))
                t += duration
            elif op == POST:
                c = ins[1]
                if post[c] is None:
                    post[c] = t
                    try_start(c)
                if ins[2]:
                    if end[c] is None:
                        break
                    t = max(t, end[c])
            else:
                arrival = msg_end[ins[1]]
                if arrival is None:
                    break
                t = max(t, arrival)
            i += 1
        clock[r], pc[r] = t, i

    while ready:
        r = ready.popleft()
        queued[r] = False
        advance(r)
    stuck = [r for r in range(pp) if pc[r] < len(code[r])]
    if stuck:
        raise AssertionError(f"pipeline schedule deadlocks on ranks {stuck[:8]}")
    makespan = max(clock + [e for e in msg_end if e is not None])
    if record:
        for m, (s, r) in enumerate(zip(sender, receiver)):
            intervals.append(Interval(rank_of[s], msg_start[m], msg_end[m], "send"))
            intervals.append(Interval(rank_of[r], msg_start[m], msg_end[m], "recv"))
        intervals.sort(key=lambda i: (i.rank, i.start, i.end, i.kind))
    return Timeline(pp=pp, vpp=vpp, num_microbatches=num_microbatches, makespan_s=makespan, intervals=tuple(intervals))


# ----------------------------------------------------------------------------- a plan's step
@dataclass(frozen=True)
class Simulation:
    timeline: Timeline
    step_time_s: float
    """The simulated pipeline plus the terms outside it (data-parallel tail, embedding
    synchronisation, overhead), exactly as ``evaluate`` adds them to its closed form."""
    closed_form_s: float

    @property
    def pipeline_s(self) -> float:
        return self.timeline.makespan_s


def simulate_estimate(estimate: Estimate, *, overlap_p2p: bool | None = None, record: bool = True) -> Simulation:
    """Replay the schedule of an evaluated plan, stage by stage."""
    pp = len(estimate.ranks)
    vpp = len(estimate.stages) // pp
    fwd = [[0.0] * vpp for _ in range(pp)]
    bwd = [[0.0] * vpp for _ in range(pp)]
    for st in estimate.stages:
        fwd[st.rank][st.chunk] = st.fwd_s
        bwd[st.rank][st.chunk] = st.bwd_s
    timeline = simulate_pipeline(
        fwd, bwd, estimate.num_microbatches, estimate.p2p_s, overlap_p2p=overlap_p2p, record=record
    )
    outside = estimate.step_time_s - estimate.pipeline_s
    return Simulation(timeline=timeline, step_time_s=timeline.makespan_s + outside, closed_form_s=estimate.step_time_s)
