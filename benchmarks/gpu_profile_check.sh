#!/usr/bin/env bash
# Profile a Llama-3-8B decoder layer on one H100 or H200 at the shard shapes of tp 1, 2, 4
# and 8 with micro-batches 1 and 2, and print measured against analytical forward+backward
# time per shape with the achieved TFLOP/s. Finishes in under 5 minutes.
#
# On the GPU machine (PyTorch present; no package index needed):
#   bash benchmarks/gpu_profile_check.sh [--wheels DIR] [--out DIR]
# The other packages travel as wheels in DIR (default: .whl in the repository). Prepare
# them on a machine with a package index, in the repository:
#   bash benchmarks/gpu_profile_check.sh --download-wheels .whl
# A dry run of the same steps on a CPU, with the tiny model (what the tests run):
#   bash benchmarks/gpu_profile_check.sh --cpu-dry-run
#
# Results: a table on stdout; OUT/profile.json (a profile that `plan profile=` takes),
# OUT/check.json (the comparison as JSON) and OUT/plan.json (a plan from the profile).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="$REPO/.whl"
OUT_DIR="${OUT:-/tmp/uniap_gpu_profile_check}"
MODE=gpu
TIME_LIMIT=270  # seconds for the profile itself; the whole script stays under 5 minutes

while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    --cpu-dry-run) MODE=cpu; shift ;;
    --download-wheels) MODE=download; WHEELS="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_profile_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$MODE" = download ]; then
  # The versions installed here, as wheels for CPython 3.12 on x86-64 Linux. antlr4 (for
  # Hydra) exists only as a source archive, which pip builds there with setuptools.
  mkdir -p "$WHEELS"
  pkgs=$("$PY" - <<'EOF'
from importlib import metadata
# PuLP's log parser (orloge) brings pydantic, which a bare PyTorch image may lack.
names = ["megatron-core", "hydra-core", "omegaconf", "pulp", "highspy", "orloge", "cpsat-logutils", "pydantic",
         "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"]
print(" ".join(f"{n}=={metadata.version(n)}" for n in names))
EOF
)
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" $pkgs
  antlr=$("$PY" -c 'from importlib import metadata; print(metadata.version("antlr4-python3-runtime"))')
  "$PY" -m pip download --no-deps --no-binary=:all: -d "$WHEELS" "antlr4-python3-runtime==$antlr"
  ls -l "$WHEELS"
  exit 0
fi

mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
[ -d "$WHEELS" ] && WHEELS="$(cd "$WHEELS" && pwd)"
SITE="$OUT_DIR/site"
# Run outside the repository: its source tree would shadow the installed package (whose
# configs are packaged as uniap_megatron.hydra_configs).
cd "$OUT_DIR"

# 1. Packages: what the wheel folder brings, then this repository itself (no index used).
if ls "$WHEELS"/*.whl "$WHEELS"/*.tar.gz >/dev/null 2>&1; then
  echo "installing $(ls "$WHEELS" | wc -l) packages from $WHEELS" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation \
    --upgrade --target "$SITE" "$WHEELS"/*.whl $(ls "$WHEELS"/*.tar.gz 2>/dev/null || true)
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import uniap_megatron.hydra_configs" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" "$REPO"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
missing=$("$PY" - 2>/dev/null <<'EOF'
import importlib
names = ["torch", "megatron.core", "hydra", "omegaconf", "rich", "uniap_megatron.profile.runner"]
bad = []
for n in names:
    try:
        importlib.import_module(n)
    except Exception as err:  # report every missing piece at once
        bad.append(f"{n} ({type(err).__name__}: {err})")
print("; ".join(bad))
EOF
)
if [ -n "$missing" ]; then
  echo "gpu_profile_check: cannot import: $missing" >&2
  echo "Bring the wheels along: bash benchmarks/gpu_profile_check.sh --download-wheels .whl (where pip works)." >&2
  exit 2
fi

# 2. What to profile: the GPU's cluster config, or the tiny model on the CPU.
if [ "$MODE" = gpu ]; then
  gpu=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')
  if [ -z "$gpu" ]; then
    echo "gpu_profile_check: no GPU visible to torch; use --cpu-dry-run on a CPU." >&2
    exit 2
  fi
  case "$gpu" in
    *H200*) CLUSTER=dgx_h200 ;;
    *H100*) CLUSTER=dgx_h100 ;;
    *) echo "gpu_profile_check: $gpu is neither an H100 nor an H200." >&2; exit 2 ;;
  esac
  echo "profiling on $gpu (cluster=$CLUSTER)" >&2
  # dgx_h100/h200 have 8 GPUs per node: the candidates' tp are 1, 2, 4 and 8.
  SETUP=(model=llama3_8b "cluster=$CLUSTER")
  DEVICE=(profile.device=cuda profile.layer_spec=auto profile.warmup=2 profile.repeats=5)
else
  SETUP=(model=tiny cluster=cpu)
  DEVICE=(profile.device=cpu profile.layer_spec=local+sdpa profile.warmup=1 profile.repeats=2)
fi

# 3. Profile the shapes (one process: a lone GPU builds every tp at its shard shape), then
# compare with the analytical model, then plan from the profile.
PROFILE="$OUT_DIR/profile.json"
timeout "$TIME_LIMIT" "$PY" -m uniap_megatron.cli profile --quiet "${SETUP[@]}" "${DEVICE[@]}" \
  profile.nproc=1 'profile.mbs=[1,2]' 'profile.recompute=[none]' "profile.output=$PROFILE" >"$OUT_DIR/profile.txt"
"$PY" "$REPO/benchmarks/gpu_profile_check.py" "$PROFILE" "${SETUP[@]}" --json >"$OUT_DIR/check.json"
"$PY" "$REPO/benchmarks/gpu_profile_check.py" "$PROFILE" "${SETUP[@]}"
if ! why=$("$PY" -c "import pulp, highspy" 2>&1); then
  echo "no plan from the profile: the solver does not import here: $(echo "$why" | tail -1)" >&2
else
  # Pinned to shapes the profile holds (cp 1, mbs 1, no recomputation), so that the plan's
  # computation comes from the measurements; its output says which parts did.
  if "$PY" -m uniap_megatron.cli plan --json "${SETUP[@]}" strategy.cp=1 strategy.mbs=1 strategy.recompute=none \
      "profile=$PROFILE" >"$OUT_DIR/plan.json" 2>"$OUT_DIR/plan.err"; then
    "$PY" - "$OUT_DIR/plan.json" <<'EOF'
import json, sys
plan = json.load(open(sys.argv[1]))
s = plan["strategy"]
print(f"plan from the profile: tp {s['tp']} pp {s['pp']} dp {s['dp']} mbs {s['mbs']}, layout {plan['layout']}, "
      f"step {plan['predicted']['step_time_s']:.3f} s")
for part, source in plan["cost_sources"].items():
    print(f"  {part}: {source}")
EOF
  else
    echo "plan from the profile failed: $(tail -1 "$OUT_DIR/plan.err")" >&2
  fi
fi
echo "wrote $PROFILE, $OUT_DIR/check.json, $OUT_DIR/plan.json" >&2
