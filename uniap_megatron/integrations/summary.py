"""The one-screen summary a planned job logs: the plan, what changed in the config, what
was pinned and what was assumed."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from uniap_megatron.emit.overrides import override_value
from uniap_megatron.integrations.inject import ABSENT
from uniap_megatron.report import strategy_table


def summary_text(injection, plan_path: Path | None) -> str:
    plan = injection.plan
    buffer = io.StringIO()
    console = Console(file=buffer, width=110, no_color=True, highlight=False, emoji=False)
    console.print(strategy_table(plan))
    lines = [f"uniap-megatron plan ({injection.app.target.value} config)", buffer.getvalue().rstrip()]
    if injection.changes:
        lines.append("Written into the config:")
        lines += [
            f"  {c.key} = {override_value(c.new)}  ({'added' if c.old is ABSENT else 'was ' + override_value(c.old)})"
            for c in injection.changes
        ]
    else:
        lines.append("The config already held this plan; nothing changed.")
    if injection.app.pinned:
        pins = ", ".join(f"{k}={override_value(v)}" for k, v in injection.app.pinned.items())
        lines.append(f"Pinned on the command line, kept: {pins}")
    lines += [f"Assumed: {a}" for a in injection.app.assumed]
    if plan_path is not None:
        lines.append(f"Plan: {plan_path}")
    return "\n".join(lines)
