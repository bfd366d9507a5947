"""From a validated request to a plan: the one place that turns a
:class:`~uniap_megatron.spec.config.PlanRequest` into search options and runs the search
(``plan``, ``launch``, the Hydra integration and the recipe generator all come here)."""

from __future__ import annotations

from uniap_megatron.plan import Plan
from uniap_megatron.spec.config import PlanRequest


def plan_request(req: PlanRequest, progress=None, *, profile: str | None = None) -> Plan:
    """``profile``: a profile file whose measured costs replace the analytical ones where it
    has them."""
    from uniap_megatron.cost.activations import Implementation
    from uniap_megatron.solver.options import SolverOptions
    from uniap_megatron.solver.search import SearchOptions, search

    implementation = Implementation(req.implementation)
    source = None
    if profile is not None:
        from uniap_megatron.cost.measured import ProfileSource

        source = ProfileSource.from_file(profile, req.model, req.cluster, req.train, implementation)
    options = SearchOptions(
        solver=SolverOptions(name=req.solver.name, time_limit_s=req.solver.time_limit_s),
        top_k=req.solver.top_k,
        max_programs=req.solver.max_programs,
        max_prefix_calls=req.solver.max_prefix_calls,
        implementation=implementation,
        cost_source=source,
    )
    result = search(req.model, req.cluster, req.train, req.pins, options, progress=progress)
    extra = {}
    if source is not None:
        extra["cost_sources"] = (("profile", profile), *source.sources(result.best.strategy).items())
    return Plan.from_search(result, req.model, req.cluster, req.train, **extra)
