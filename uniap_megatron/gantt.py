"""A picture of one planned iteration: the simulated schedule of every pipeline rank (forward,
backward, p2p transfers, idle time) and its memory against the capacity.

Imported only when ``plan gantt=FILE.png`` asks for it, so that ``plan`` itself never pays
for matplotlib.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from uniap_megatron.cost.simulate import Simulation, Timeline, simulate_estimate
from uniap_megatron.cost.step import GIB

FORWARD = ("#4C72B0", "#8FAADC")  # chunk 0 darker, later chunks lighter
BACKWARD = ("#DD8452", "#F2B48C")
P2P = "#C44E52"
IDLE = "#E6E6E6"
TAIL = "#8C8C8C"
STATIC, ACTIVATION, TRANSIENT = "#55A868", "#8172B3", "#CCB974"
MAX_EDGES = 1600  # white edges between bars up to this many bars (beyond, they hide the colours)


def _grouped(timeline: Timeline) -> dict[tuple[int, str, int], list[tuple[float, float]]]:
    """(start, width) of every interval, by rank, kind and chunk parity."""
    out: dict[tuple[int, str, int], list[tuple[float, float]]] = {}
    for i in timeline.intervals:
        out.setdefault((i.rank, i.kind, max(i.chunk, 0) % 2), []).append((i.start, i.end - i.start))
    return out


def _scale(seconds: float) -> tuple[float, str]:
    return (1e3, "ms") if seconds < 10 else (1.0, "s")


def _num(value: float) -> str:
    """Three significant digits without scientific notation."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def figure(plan, simulation: Simulation | None = None):
    """The matplotlib figure of ``plan``'s iteration (a ``uniap_megatron.plan.Plan``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    est = plan.estimate
    sim = simulation or simulate_estimate(est)
    tl = sim.timeline
    pp = tl.pp
    tails = [r.dp_exposed_s + r.optimizer_s for r in est.ranks]
    end = tl.makespan_s + max(tails)  # the fixed per-step overhead is named, not drawn
    factor, unit = _scale(end)

    top, bottom = 0.8, 1.0  # inches: titles above, axis labels and legend below
    height = top + bottom + max(1.0, 0.42 * pp)
    fig, (ax, mem) = plt.subplots(
        1, 2, figsize=(15, height), sharey=True, gridspec_kw={"width_ratios": [4.2, 1], "wspace": 0.04}
    )
    passes = [i for i in tl.intervals if i.kind in ("forward", "backward")]
    groups = _grouped(tl)
    busy = [0.0] * pp
    for i in passes:
        busy[i.rank] += i.end - i.start
    edge = 0.3 if len(passes) <= MAX_EDGES else 0.0
    for r in range(pp):
        y = pp - 1 - r  # rank 0 on top
        ax.broken_barh([(0, tl.makespan_s * factor)], (y - 0.4, 0.8), color=IDLE, zorder=0)
        for parity in (0, 1):
            for kind, colors in (("forward", FORWARD), ("backward", BACKWARD)):
                bars = [(s * factor, w * factor) for s, w in groups.get((r, kind, parity), [])]
                ax.broken_barh(bars, (y - 0.4, 0.8), color=colors[parity], edgecolor="white", linewidth=edge, zorder=2)
        transfers = [(s * factor, w * factor) for kind in ("send", "recv") for s, w in groups.get((r, kind, 0), [])]
        ax.broken_barh(transfers, (y - 0.47, 0.07), color=P2P, zorder=3)
        if tails[r] > 0:
            ax.broken_barh([(tl.makespan_s * factor, tails[r] * factor)], (y - 0.4, 0.8), color=TAIL, hatch="//",
                           edgecolor="white", linewidth=0.0, zorder=2)
        idle = 1 - busy[r] / tl.makespan_s
        ax.text((tl.makespan_s + tails[r]) * factor, y, f" idle {idle:.0%}", ha="left", va="center", fontsize=7.5,
                color="#444")
    # Micro-batch numbers where a bar is wide enough to hold them (about 1/90 of the axis).
    wide = end / 90
    for i in passes:
        if i.end - i.start >= wide * len(str(i.microbatch)):
            ax.text((i.start + i.end) / 2 * factor, pp - 1 - i.rank, str(i.microbatch), ha="center", va="center",
                    fontsize=6.5, color="white", zorder=4)
    ax.set_yticks(range(pp))
    ax.set_yticklabels([f"pp rank {r}" for r in reversed(range(pp))])
    ax.set_ylim(-0.7, pp - 0.3)
    ax.set_xlim(0, end * factor * 1.07)
    ax.set_xlabel(f"time in the iteration ({unit})")
    ax.grid(axis="x", color="#DDDDDD", linewidth=0.6, zorder=-1)
    chunks = f", {tl.vpp} chunks per rank" if tl.vpp > 1 else ""
    ax.set_title(
        f"Simulated iteration: {tl.num_microbatches} micro-batches{chunks}; pipeline {_num(tl.makespan_s * factor)} "
        f"{unit}, step {_num(sim.step_time_s * factor)} {unit} (with {_num((est.overhead_s + est.embedding_sync_s) * factor)}"
        f" {unit} fixed)",
        fontsize=10, loc="left",
    )
    usable = est.capacity_bytes / GIB
    for r, rank in enumerate(est.ranks):
        y = pp - 1 - r
        parts = (rank.static_bytes / GIB, rank.activation_bytes / GIB, rank.transient_bytes / GIB)
        left = 0.0
        for value, color in zip(parts, (STATIC, ACTIVATION, TRANSIENT)):
            mem.barh(y, value, left=left, height=0.7, color=color, zorder=2)
            left += value
        over = left > usable * (1 + 1e-9)
        mem.text(left, y, f" {left:.1f}", va="center", ha="left", fontsize=7.5,
                 color="#C44E52" if over else "#222", zorder=3)
    mem.axvline(usable, color="#C44E52", linewidth=1.2, zorder=4)
    mem.axvline(plan.cluster.memory_gib, color="#888", linewidth=1.0, linestyle="--", zorder=4)
    mem.set_xlim(0, plan.cluster.memory_gib * 1.18)
    mem.set_xlabel("GiB per GPU")
    mem.set_title("Peak memory per rank", fontsize=10, loc="left")
    mem.grid(axis="x", color="#DDDDDD", linewidth=0.6, zorder=-1)
    handles = [
        Patch(color=FORWARD[0], label="forward" + (" (lighter: odd chunks)" if tl.vpp > 1 else "")),
        Patch(color=BACKWARD[0], label="backward with recomputation"),
        Patch(color=P2P, label="p2p transfer"),
        Patch(color=IDLE, label="idle (bubble, waits)"),
        Patch(facecolor=TAIL, hatch="//", edgecolor="white", label="grad sync + optimizer"),
        Patch(color=STATIC, label="weights, grads, optimizer"),
        Patch(color=ACTIVATION, label="activations in flight"),
        Patch(color=TRANSIENT, label="recompute buffer"),
        plt.Line2D([], [], color="#C44E52", label=f"usable memory {usable:.1f} GiB"),
        plt.Line2D([], [], color="#888", linestyle="--", label=f"device memory {plan.cluster.memory_gib:.1f} GiB"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0))

    s = plan.strategy
    fig.suptitle(
        f"{plan.model.name} on {plan.cluster.num_nodes} x {plan.cluster.gpus_per_node} {plan.cluster.gpu}: "
        f"{s.short()}   layout {plan.layout.to_megatron()[:90]}",
        fontsize=11, x=0.01, ha="left",
    )
    fig.subplots_adjust(left=0.07, right=0.985, top=1 - top / height, bottom=bottom / height)
    return fig


def write_gantt(plan, path: str | Path, simulation: Simulation | None = None) -> Path:
    """Draw ``plan`` into ``path`` (PNG, SVG or PDF by suffix), replacing it atomically."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig = figure(plan, simulation)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=130, format=(path.suffix.lstrip(".") or "png"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
