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


class InfeasibleError(UniapError):
    """No strategy satisfies the constraints (memory, divisibility, pins)."""


class SolverError(UniapError):
    """The mixed integer program could not be solved (solver missing, failed, timed out)."""

    exit_code = 3
