"""Settings of the mixed integer program's solver (no PuLP import: most plans never need it)."""

from __future__ import annotations

from dataclasses import dataclass

from uniap_megatron.errors import InputError

SOLVERS = ("highs", "cbc", "gurobi", "cpsat", "scip")


@dataclass(frozen=True)
class SolverOptions:
    name: str = "highs"
    time_limit_s: float = 10.0
    """A safety net; the deterministic limit is ``max_nodes``."""
    gap_rel: float = 1e-9
    threads: int = 1
    max_nodes: int = 20000

    def __post_init__(self) -> None:
        if self.name.lower() not in SOLVERS:
            raise InputError(f"solver.name ({self.name!r}) must be one of: {', '.join(SOLVERS)}.")
