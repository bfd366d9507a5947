"""Check a plan against the real megatron-core and Megatron-LM, on the CPU.

``uniap-megatron validate PLAN`` calls :func:`validate_plan` on :func:`load_plan`'s result.
This package imports torch and megatron-core; ``plan`` never imports it.
"""

from uniap_megatron.validate.check import ValidationReport, validate_plan
from uniap_megatron.validate.plan_file import PlanDocument, load_plan

__all__ = ["PlanDocument", "ValidationReport", "load_plan", "validate_plan"]
