"""The short summary ``validate`` prints: per pipeline rank, its layers and parameters
predicted against built, then how the model was built."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from uniap_megatron.space.layout import Layout
from uniap_megatron.validate.check import ValidationReport


def _layers(stages: tuple[str, ...]) -> str:
    return " | ".join(Layout(stages=(s,), pp=1).to_megatron() or "(empty)" for s in stages)


def render(report: ValidationReport, console: Console) -> None:
    doc, s = report.plan, report.plan.strategy
    console.print(
        f"[bold]{doc.source}[/bold]: {doc.model.name}, {s.short()}, layout {doc.layout_text}"
    )
    console.print(
        "megatron-core TransformerConfig and PipelineParallelLayerLayout accept the plan; "
        "Megatron-LM parse_args and validate_args accept its flags."
    )
    table = Table(title="Parameters per GPU", title_justify="left")
    for col, just in (("pp rank", "right"), ("layers (per virtual stage)", "left"), ("predicted", "right"),
                      ("built", "right"), ("", "left")):
        table.add_column(col, justify=just)
    for row in report.rows:
        built = ", ".join(f"{b:,}" for b in row.built) if row.built else "-"
        mark = "" if not row.built else ("equal" if row.built == (row.predicted,) else "DIFFERENT")
        table.add_row(str(row.pp_rank), _layers(row.layers), f"{row.predicted:,}", built, mark)
    console.print(table)
    for note in report.notes:
        console.print(f"- {note}", highlight=False)


def to_dict(report: ValidationReport) -> dict:
    return {
        "plan": report.plan.source,
        "valid": True,
        "ranks": [
            {"pp_rank": r.pp_rank, "layers": list(r.layers), "predicted_params": r.predicted,
             "built_params": list(r.built)}
            for r in report.rows
        ],
        "device": None if report.build is None else report.build.device,
        "notes": list(report.notes),
    }
