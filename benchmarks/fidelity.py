"""How well the cost model predicts published Megatron step times.

Every row of ``benchmarks/data/published_calibration.csv`` pins its published configuration
(TP/PP/VPP/CP/DP, SP, recompute, micro-batch where published) and its source's software
(``benchmarks/data/sources.yaml``); the planner's cost model chooses the unpublished fields
over Megatron's even layout and predicts the step time. Printed: per row measured vs
predicted, the error and the memory; MAPE overall and per source; the leave-one-source-out
error (constants refitted without the source, docs/calibration.md).

    python benchmarks/fidelity.py            # table, with the constants of hydra_configs/cluster
    python benchmarks/fidelity.py --json     # {"rows": [...], "mape": x, ...}
    python benchmarks/fidelity.py --fit      # also fit the constants on every row (in-sample)
    python benchmarks/fidelity.py --no-loso  # skip the refits (seconds instead of minutes)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from uniap_megatron.calibration.fit import fit, leave_one_source_out
from uniap_megatron.calibration.measurements import (
    cluster_for,
    cluster_names_by_gpu,
    read_measurements,
    read_sources,
)
from uniap_megatron.calibration.predict import Case, Constants, RowPrediction

DATA = Path(__file__).resolve().parent / "data"
TARGETS = {"mape": 0.12, "max_abs_error": 0.30, "loso_mape": 0.18}


def load_cases(csv_path: Path, sources_path: Path) -> list[Case]:
    settings = read_sources(sources_path)
    cases = []
    for m in read_measurements(csv_path):
        if m.source not in settings:
            raise SystemExit(f"fidelity: source {m.source} of row {m.id} is not described in {sources_path}")
        cases.append(Case(m, settings[m.source], cluster_for(m)))
    return cases


def mape(rows: list[RowPrediction]) -> float:
    return sum(abs(r.error) for r in rows) / len(rows)


def by_source(rows: list[RowPrediction]) -> dict[str, float]:
    groups: dict[str, list[RowPrediction]] = defaultdict(list)
    for r in rows:
        groups[r.measurement.source].append(r)
    return {src: mape(group) for src, group in sorted(groups.items())}


def row_dict(r: RowPrediction) -> dict:
    m, e = r.measurement, r.estimate
    return {
        "id": m.id,
        "source": m.source,
        "model": m.model_name,
        "gpu": m.gpu,
        "gpus": m.num_gpus,
        "strategy": r.strategy.short(),
        "chosen": r.chosen,
        "measured_s": m.step_s,
        "predicted_s": round(r.predicted_s, 4),
        "error": round(r.error, 4),
        "fits": r.fits,
        "peak_memory_gib": round(r.peak_gib, 2),
        "usable_memory_gib": round(r.usable_gib, 2),
        "terms_s": {
            "pipeline": round(e.pipeline_s, 4),
            "bubble": round(e.bubble_s, 4),
            "dp_exposed": round(e.dp_exposed_s, 4),
            "optimizer": round(e.optimizer_s, 4),
            "embedding_sync": round(e.embedding_sync_s, 4),
            "overhead": round(e.overhead_s, 4),
        },
    }


def summary(rows: list[RowPrediction]) -> dict:
    worst = max(rows, key=lambda r: abs(r.error))
    return {
        "mape": round(mape(rows), 4),
        "mape_by_source": {k: round(v, 4) for k, v in by_source(rows).items()},
        "max_abs_error": round(abs(worst.error), 4),
        "worst_row": worst.measurement.id,
        "rows_not_fitting": [r.measurement.id for r in rows if not r.fits],
    }


def print_table(title: str, rows: list[RowPrediction]) -> None:
    print(title)
    header = f"{'id':7} {'model':12} {'gpus':>5} {'configuration':48} {'measured':>9} {'predicted':>9} {'error':>7}  memory GiB"
    print(header)
    print("-" * len(header))
    for r in rows:
        m = r.measurement
        memory = f"{r.peak_gib:5.1f}/{r.usable_gib:.1f}" + ("" if r.fits else "  DOES NOT FIT")
        config = r.strategy.short()
        if r.chosen:
            config += " *"
        print(
            f"{m.id:7} {m.model_name[:12]:12} {m.num_gpus:5d} {config[:48]:48} {m.step_s:8.2f}s "
            f"{r.predicted_s:8.2f}s {r.error:+7.1%}  {memory}"
        )
    s = summary(rows)
    per_source = "  ".join(f"{k} {v:.1%}" for k, v in s["mape_by_source"].items())
    print(f"MAPE {s['mape']:.1%} ({per_source}); worst {s['worst_row']} {s['max_abs_error']:.1%}")
    print("* the planner chose the unpublished fields (micro-batch, SP, recompute)\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--data", type=Path, default=DATA / "published_calibration.csv")
    parser.add_argument("--sources", type=Path, default=DATA / "sources.yaml")
    parser.add_argument("--fit", action="store_true", help="also fit the constants on every row (in-sample)")
    parser.add_argument("--no-loso", action="store_true", help="skip the leave-one-source-out refits")
    args = parser.parse_args(argv)

    def note(text: str) -> None:
        print(f"fidelity: {text}", file=sys.stderr, flush=True)

    cases = load_cases(args.data, args.sources)
    names = cluster_names_by_gpu()
    gpus = sorted({c.measurement.gpu for c in cases})
    configured = {gpu: Constants.of(next(c.cluster for c in cases if c.measurement.gpu == gpu)) for gpu in gpus}
    rows = [c.predict() for c in cases]
    out = {"rows": [row_dict(r) for r in rows], **summary(rows)}
    out["constants"] = {gpu: {"cluster": names[gpu], **configured[gpu].to_dict()} for gpu in gpus}

    fitted_rows = None
    if args.fit:
        out["fitted"] = {}
        fitted_rows = []
        for gpu in gpus:
            note(f"fitting {gpu} on {sum(c.measurement.gpu == gpu for c in cases)} rows")
            result = fit([c for c in cases if c.measurement.gpu == gpu])
            fitted_rows += list(result.rows)
            out["fitted"][gpu] = {**result.constants.to_dict(), "loss": round(result.loss, 6),
                                  "evaluations": result.evaluations}
        fitted_rows.sort(key=lambda r: [c.measurement.id for c in cases].index(r.measurement.id))
        out["fitted"].update(summary(fitted_rows))

    loso_rows = None
    if not args.no_loso:
        loso = leave_one_source_out(cases, progress=lambda src: note(f"leave-one-source-out: refitting without {src}"))
        order = {c.measurement.id: i for i, c in enumerate(cases)}
        loso_rows = sorted((r for _, predictions in loso.values() for r in predictions),
                           key=lambda r: order[r.measurement.id])
        out["loso"] = {
            **summary(loso_rows),
            "constants": {src: {gpu: c.to_dict() for gpu, c in constants.items()} for src, (constants, _) in loso.items()},
            "rows": [{"id": r.measurement.id, "predicted_s": round(r.predicted_s, 4), "error": round(r.error, 4)}
                     for r in loso_rows],
        }
    out["targets"] = TARGETS
    out["met"] = {
        "mape": out["mape"] <= TARGETS["mape"],
        "max_abs_error": out["max_abs_error"] <= TARGETS["max_abs_error"],
        **({"loso_mape": out["loso"]["mape"] <= TARGETS["loso_mape"]} if loso_rows else {}),
    }

    if args.json:
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return 0
    consts = "; ".join(
        f"{gpu} ({names[gpu]}): gemm {c.gemm_efficiency}, comm {c.comm_efficiency}, overhead {c.step_overhead_s} s"
        for gpu, c in configured.items()
    )
    print_table(f"Predicted vs measured step time, constants from hydra_configs/cluster: {consts}", rows)
    if fitted_rows:
        fitted = "; ".join(
            f"{gpu}: gemm {v['gemm_efficiency']}, comm {v['comm_efficiency']}, overhead {v['step_overhead_s']} s"
            for gpu, v in out["fitted"].items() if gpu in gpus
        )
        print_table(f"In-sample, constants fitted on every row of each GPU: {fitted}", fitted_rows)
    if loso_rows:
        print_table("Leave one source out (constants refitted without the row's source)", loso_rows)
        for src, (constants, _) in loso.items():
            text = "; ".join(f"{gpu}: gemm {c.gemm_efficiency}, comm {c.comm_efficiency}, overhead {c.step_overhead_s} s"
                             for gpu, c in constants.items())
            print(f"  without {src}: {text}")
    met = ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in out["met"].items())
    print(f"\nTargets: MAPE <= {TARGETS['mape']:.0%}, every row within {TARGETS['max_abs_error']:.0%}, "
          f"leave-one-source-out MAPE <= {TARGETS['loso_mape']:.0%}: {met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
