"""A plan: the chosen strategy and layout with its predicted figures, ready to emit.

``Plan.to_dict()`` is the JSON document ``plan --json`` prints and ``plan.json`` holds.
Everything in it except the ``timing`` section depends only on the input, so the same
input gives the same bytes on every run and every rank.

The search ranks plans by the closed-form pipeline time; before one is chosen, the best few
are replayed by the discrete-event simulation of Megatron's schedule
(``cost/simulate.py``) and re-ranked by its step time, ties kept in the search's order.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from uniap_megatron import __version__
from uniap_megatron.cost.flops import model_flops_per_step
from uniap_megatron.cost.params import total_params
from uniap_megatron.cost.simulate import simulate_estimate
from uniap_megatron.cost.step import GIB, Estimate
from uniap_megatron.emit.megatron_args import megatron_args
from uniap_megatron.solver.search import SearchResult, Solution, significant
from uniap_megatron.space.layout import Layout
from uniap_megatron.space.strategy import Strategy
from uniap_megatron.spec.cluster import ClusterSpec
from uniap_megatron.spec.model import ModelSpec
from uniap_megatron.spec.train import TrainSpec


@dataclass(frozen=True)
class Prediction:
    step_time_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    peak_memory_gib: tuple[float, ...]
    memory_capacity_gib: float

    @classmethod
    def of(
        cls, est: Estimate, model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, step_time_s: float | None = None
    ) -> Prediction:
        """``step_time_s``: the simulated step time when there is one, else the closed form's."""
        step = est.step_time_s if step_time_s is None else step_time_s
        tokens = train.tokens_per_step
        flops = model_flops_per_step(model, global_batch_size=train.global_batch_size, seq=train.seq_length)
        peak = cluster.peak_flops("bf16") * cluster.world_size
        return cls(
            step_time_s=step,
            tokens_per_s_per_gpu=tokens / step / cluster.world_size,
            mfu=flops / step / peak,
            peak_memory_gib=tuple(r.peak_gib for r in est.ranks),
            memory_capacity_gib=cluster.memory_gib,
        )


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    cluster: ClusterSpec
    train: TrainSpec
    strategy: Strategy
    layout: Layout
    estimate: Estimate
    prediction: Prediction
    alternatives: tuple[Solution, ...] = ()
    search: SearchResult | None = None
    simulated_step_s: tuple[float, ...] = ()
    """Simulated step time of the plan and of each alternative, in that order."""
    cost_sources: tuple[tuple[str, str], ...] = (("compute", "analytical"), ("communication", "analytical"), ("memory", "analytical"))

    @classmethod
    def from_search(cls, result: SearchResult, model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, **extra) -> Plan:
        ranked = rerank((result.best, *result.alternatives))
        best, best_s = ranked[0]
        return cls(
            model=model,
            cluster=cluster,
            train=train,
            strategy=best.strategy,
            layout=best.layout,
            estimate=best.estimate,
            prediction=Prediction.of(best.estimate, model, cluster, train, step_time_s=best_s),
            alternatives=tuple(solution for solution, _ in ranked[1:]),
            search=result,
            simulated_step_s=tuple(step for _, step in ranked),
            **extra,
        )

    def alternative_step_s(self, index: int) -> float:
        """Simulated step time of ``alternatives[index]`` (closed form if not simulated)."""
        if len(self.simulated_step_s) == len(self.alternatives) + 1:
            return self.simulated_step_s[index + 1]
        return self.alternatives[index].estimate.step_time_s

    @property
    def alternative_predictions(self) -> tuple[Prediction, ...]:
        return tuple(
            Prediction.of(a.estimate, self.model, self.cluster, self.train, step_time_s=self.alternative_step_s(i))
            for i, a in enumerate(self.alternatives)
        )

    @property
    def megatron_args(self) -> list[str]:
        return megatron_args(self.strategy, self.layout, self.train)

    def to_dict(self, *, with_timing: bool = True) -> dict:
        p, e = self.prediction, self.estimate
        out = {
            "uniap_megatron_version": __version__,
            "model": _spec_dict(self.model),
            "cluster": _spec_dict(self.cluster),
            "train": _spec_dict(self.train),
            "strategy": self.strategy.to_dict(),
            "layout": self.layout.to_megatron(),
            "predicted": {
                "step_time_s": _r(p.step_time_s),
                "closed_form_step_time_s": _r(e.step_time_s),
                "tokens_per_s_per_gpu": _r(p.tokens_per_s_per_gpu),
                "mfu": _r(p.mfu),
                "peak_memory_gib": [_r(x) for x in p.peak_memory_gib],
                "memory_capacity_gib": p.memory_capacity_gib,
                "usable_memory_gib": _r(e.capacity_bytes / GIB),
                "model_parameters": total_params(self.model),
                "terms_s": {
                    "pipeline": _r(e.pipeline_s),
                    "bubble": _r(e.bubble_s),
                    "dp_exposed": _r(e.dp_exposed_s),
                    "optimizer": _r(e.optimizer_s),
                    "embedding_sync": _r(e.embedding_sync_s),
                    "overhead": _r(e.overhead_s),
                },
            },
            "stages": [
                {
                    "stage": st.index,
                    "pp_rank": st.rank,
                    "vpp_rank": st.chunk,
                    "layers": st.layers,
                    "recomputed_layers": st.recomputed,
                    "time_ms": _r(st.time_s * 1e3),
                    "forward_ms": _r(st.fwd_s * 1e3),
                    "backward_ms": _r(st.bwd_s * 1e3),
                    "params": st.params,
                    "static_gib": _r(st.static_bytes / GIB),
                    "activation_gib_per_microbatch": _r(st.act_bytes / GIB),
                }
                for st in e.stages
            ],
            "ranks": [
                {
                    "pp_rank": r.rank,
                    "time_per_microbatch_ms": _r(r.time_s * 1e3),
                    "static_gib": _r(r.static_bytes / GIB),
                    "activation_gib": _r(r.activation_bytes / GIB),
                    "transient_gib": _r(r.transient_bytes / GIB),
                    "peak_gib": _r(r.peak_gib),
                    "dp_exposed_ms": _r(r.dp_exposed_s * 1e3),
                    "optimizer_ms": _r(r.optimizer_s * 1e3),
                }
                for r in e.ranks
            ],
            "megatron_args": self.megatron_args,
            "alternatives": [
                {
                    "strategy": a.strategy.to_dict(),
                    "layout": a.layout.to_megatron(),
                    "step_time_s": _r(self.alternative_step_s(i)),
                    "closed_form_step_time_s": _r(a.estimate.step_time_s),
                    "tokens_per_s_per_gpu": _r(alt.tokens_per_s_per_gpu),
                    "mfu": _r(alt.mfu),
                    "peak_memory_gib": _r(a.estimate.peak_bytes / GIB),
                }
                for i, (a, alt) in enumerate(zip(self.alternatives, self.alternative_predictions))
            ],
            "cost_sources": dict(self.cost_sources),
        }
        if self.search is not None:
            st = self.search.stats
            out["solver"] = {
                "status": "optimal" if st.complete and st.search_gap == 0 else "feasible",
                "program_statuses": list(st.statuses),
                "gap": _r(st.search_gap),
                "configs_enumerated": st.configs_enumerated,
                "configs_pruned_by_memory": st.configs_pruned_by_memory,
                "configs_pruned_by_bound": st.configs_pruned_by_bound,
                "programs_solved": st.programs_solved,
                "programs_infeasible": st.programs_infeasible,
                "complete": st.complete,
            }
            if with_timing:
                out["solve_time_s"] = _r(st.wall_s, 3)
        return out

    def to_json(self, *, with_timing: bool = True) -> str:
        return json.dumps(self.to_dict(with_timing=with_timing), indent=2, sort_keys=False) + "\n"


def rerank(candidates: tuple[Solution, ...]) -> list[tuple[Solution, float]]:
    """The candidates with their simulated step times, fastest first; equal times keep the
    search's order, so the choice is deterministic."""
    simulated = [
        c.simulated_s if math.isfinite(c.simulated_s) else simulate_estimate(c.estimate, record=False).step_time_s
        for c in candidates
    ]
    order = sorted(range(len(candidates)), key=lambda i: (significant(simulated[i]), i))
    return [(candidates[i], simulated[i]) for i in order]


def _r(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}") if abs(x) >= 1 else round(x, digits)


def _spec_dict(spec) -> dict:
    out = {}
    for f in dataclasses.fields(spec):
        v = getattr(spec, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else (v.value if hasattr(v, "value") else v)
    return out
