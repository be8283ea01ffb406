#!/usr/bin/env bash
# The project's accelerator check (benchmarks/gpu_check.py): compiled kernels vs float64 first,
# then bf16 BSR forward and forward+backward (dX, dW split) vs cuBLAS dense at 0/50/90% block
# sparsity on 4096^2 and GPT-shaped layers, a 12x768 GPT train step (dense vs BSR vs masked
# dense) with MFU and compile time, and one jax-triton kernel. At most 8 minutes on one H100:
# the tasks' own budget is BUDGET_S (default 420 s) and the whole run is killed at 480 s.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]          # on the GPU machine (OUTDIR default: $OUT/gpu_check)
#   bash benchmarks/gpu_check.sh --tiny [OUTDIR]   # CPU, tiny shapes, Pallas interpret mode
# Uses the installed jax; the checkout is put on PYTHONPATH (no pip, no network).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
TINY=""
if [ "${1:-}" = "--tiny" ]; then TINY="--tiny"; shift; fi
OUTDIR="${1:-${OUT:-/tmp}/gpu_check}"
mkdir -p "$OUTDIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -n "$TINY" ]; then
  export JAX_PLATFORMS=cpu
else
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
    2>/dev/null | tee "$OUTDIR/gpu.txt"
  "$PY" -c "import jax; d = jax.devices(); assert d[0].platform == 'gpu', d" \
    || { echo "gpu_check: no GPU visible to JAX (--tiny runs the CPU dry run)"; exit 2; }
fi
timeout -k 10 "${TIMEOUT_S:-480}" "$PY" benchmarks/gpu_check.py $TINY --out "$OUTDIR" \
  --budget "${BUDGET_S:-420}" ${ONLY:+--only "$ONLY"} 2>&1 | tee "$OUTDIR/gpu_check.log"
RC=${PIPESTATUS[0]}
[ "$RC" = 124 ] && echo "gpu_check: killed at ${TIMEOUT_S:-480}s; partial results in $OUTDIR/gpu_check.json"
exit "$RC"
