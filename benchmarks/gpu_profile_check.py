"""Measured against analytical: the decoder-layer shapes of a profile, side by side.

    python benchmarks/gpu_profile_check.py PROFILE.json model=llama3_8b cluster=dgx_h100 [--json]

For every measured decoder-layer shape: forward and backward time, the analytical model's
computation time for the same shape (FLOPs at the cluster's calibrated GEMM efficiency plus
the memory-bound terms), their ratio, the achieved TFLOP/s (3 x forward model FLOPs over the
measured forward + backward), and the memory figures. Prints a table, or one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

from uniap_megatron.cli import compose
from uniap_megatron.cost.activations import Implementation
from uniap_megatron.profile import format as fmt
from uniap_megatron.profile.report import compare
from uniap_megatron.spec.config import request_from_config

GIB = 1024**3


def rows(profile: fmt.Profile, overrides: list[str], kinds: tuple[str, ...]) -> list[dict]:
    req = request_from_config(compose(overrides))
    out = []
    for m in profile.layers:
        if m.key.kind not in kinds:
            continue
        row = {"item": m.key.kind, "tp": m.key.tp, "mbs": m.key.mbs, "seq": m.key.seq, "recompute": m.key.recompute,
               "status": m.status}
        if m.status == "ok":
            c = compare(m, req.model, req.cluster, req.train, Implementation(profile.implementation))
            row |= {
                "fwd_ms": round(m.fwd_s * 1e3, 4), "bwd_ms": round(m.bwd_s * 1e3, 4),
                "measured_ms": round(c.measured_s * 1e3, 4), "analytical_ms": round(c.analytical_s * 1e3, 4),
                "measured_over_analytical": round(c.ratio, 4), "achieved_tflops": float(f"{c.achieved_tflops:.4g}"),
                "saved_gib": round(m.saved_bytes / GIB, 4),
                "peak_gib": None if m.peak_bytes is None else round(m.peak_bytes / GIB, 4),
            }
        out.append(row)
    return out


def table(result: dict) -> str:
    head = f"{'item':>4} {'tp':>3} {'mbs':>4} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} {'analyt ms':>10} " \
           f"{'ratio':>6} {'TFLOP/s':>8} {'saved GiB':>10} {'peak GiB':>9}"
    lines = [f"{result['device']} ({result['layer_spec']} spec, {result['dtype']}), cluster {result['cluster']}", head]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['item']:>4} {r['tp']:>3} {r['mbs']:>4} {r['status']}")
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(
            f"{r['item']:>4} {r['tp']:>3} {r['mbs']:>4} {r['fwd_ms']:>9.3f} {r['bwd_ms']:>9.3f} {r['measured_ms']:>9.3f} "
            f"{r['analytical_ms']:>10.3f} {r['measured_over_analytical']:>6.2f} {r['achieved_tflops']:>8.3g} "
            f"{r['saved_gib']:>10.3f} {peak:>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides naming the model and cluster")
    parser.add_argument("--kinds", default="t,t+moe", help="items to compare (default: decoder layers)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    profile = fmt.load(args.profile)
    result = {
        "device": profile.environment.device_name,
        "cluster": profile.environment.cluster_gpu,
        "layer_spec": profile.layer_spec,
        "dtype": profile.dtype,
        "torch": profile.environment.torch,
        "megatron_core": profile.environment.megatron_core,
        "rows": rows(profile, args.overrides, tuple(args.kinds.split(","))),
    }
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
