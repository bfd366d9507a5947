"""Errors that reach the user, each with the CLI exit code it maps to.

Messages follow megatron-core's style: name the field and its value, say what was wrong
and what would work. Internal invariants use ``assert``; these classes are for input and
outcomes the user can act on.
"""

from __future__ import annotations


class UniapError(Exception):
    """Base class of every error that the CLI reports without a traceback."""

    exit_code = 2


class InputError(UniapError, ValueError):
    """A configuration value is missing, malformed or inconsistent."""


def require_positive_int(field: str, value, *, allow_zero: bool = False) -> None:
    """An ``InputError`` naming ``field`` unless ``value`` is an integer >= 1 (>= 0 with
    ``allow_zero``); booleans are not integers here."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        need = "a non-negative integer" if allow_zero else "a positive integer"
        raise InputError(f"{field} ({value!r}) must be {need}.")


class InfeasibleError(UniapError):
    """No strategy satisfies the constraints (memory, divisibility, pins)."""


class ValidationError(UniapError):
    """Megatron (megatron-core or Megatron-LM's argument checks) disagrees with a plan."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"the plan does not hold against Megatron ({len(self.problems)} problem(s)):\n{lines}")


class SolverError(UniapError):
    """The mixed integer program could not be solved (solver missing, failed, timed out)."""

    exit_code = 3
