#!/usr/bin/env bash
# GPU check for pallas_kernels (issue 5), for a machine with an NVIDIA GPU and no network.
#   1. runs the kernel tests compiled (backend="pallas": Triton, not interpreted) on the GPU;
#   2. runs the kernel benchmark in bf16: 8192x8192 weights, M = 8192 and M = 16, BSR at
#      0/50/75/90/95% block sparsity (128x128 blocks) and N:M 2:4, each vs XLA's dense dot;
#   3. prints one table at the end (tests + benchmark + issue targets) and, if $OUT is set,
#      writes it there with the raw logs, the JSON results and the junit XML.
# Uses the preinstalled jax; the project is put on PYTHONPATH (no pip, no network).
# Usage: bash benchmarks/gpu_check.sh        (PYTHON=... to pick the interpreter)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
OUTDIR="${OUT:-$(mktemp -d)}"
mkdir -p "$OUTDIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_PREALLOCATE=false

"$PY" -c "import jax; d = jax.devices(); print('devices:', d, 'jax', jax.__version__); \
assert d[0].platform == 'gpu', d" || { echo "gpu_check: no GPU visible to JAX"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  | tee "$OUTDIR/gpu.txt"

# ---- 1. kernel tests, compiled on the GPU -------------------------------------------------
if "$PY" -c "import pytest" 2>/dev/null; then
  "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_kernels_bsr.py tests/test_kernels_nm.py \
    -k compiled_on_accelerator --junitxml="$OUTDIR/kernel_tests.xml" 2>&1 \
    | tee "$OUTDIR/kernel_tests.log"
  TEST_RC=${PIPESTATUS[0]}
else
  echo "pytest not installed: running the inline compiled-vs-reference check instead"
  "$PY" - <<'PYEOF' 2>&1 | tee "$OUTDIR/kernel_tests.log"
import itertools, sys
import jax, jax.numpy as jnp, numpy as np
from pallas_kernels import BSRMatrix, NMMatrix, bsr_matmul, nm_matmul
rng = np.random.default_rng(0)
fails = 0
for dtype, keep in itertools.product((jnp.float32, jnp.bfloat16), (1.0, 0.5, 0.1, 0.0)):
    mask = np.kron(rng.random((4, 8)) < keep, np.ones((64, 64)))
    w = jnp.asarray(rng.standard_normal((256, 512)) * mask, dtype)
    a = BSRMatrix.from_dense(w, block=(64, 64))
    x = jnp.asarray(rng.standard_normal((200, 256)), dtype)
    f = lambda x, v: bsr_matmul(x, BSRMatrix(v, a.layout), backend="pallas").astype(jnp.float32)
    r = lambda x, v: (x.astype(jnp.float32) @ BSRMatrix(v, a.layout).to_dense().astype(jnp.float32))
    tol = 2e-2 * (float(jnp.abs(r(x, a.values)).max()) + 1)
    err = float(jnp.abs(jax.jit(f)(x, a.values) - r(x, a.values)).max())
    g = jax.jit(jax.grad(lambda x, v: (f(x, v) ** 2).sum(), (0, 1)))(x, a.values)
    gr = jax.grad(lambda x, v: (r(x, v) ** 2).sum(), (0, 1))(x, a.values)
    gerr = max(float(jnp.abs(u.astype(jnp.float32) - v.astype(jnp.float32)).max(initial=0))
                     / (float(jnp.abs(v.astype(jnp.float32)).max(initial=0)) + 1)
               for u, v in zip(g, gr))
    ok = err <= tol and gerr <= 4e-2
    fails += not ok
    print(f"bsr {jnp.dtype(dtype).name} density={keep}: fwd err {err:.3g} (tol {tol:.3g}) "
          f"grad rel err {gerr:.3g} {'PASSED' if ok else 'FAILED'}")
for dtype, (n, m) in itertools.product((jnp.float32, jnp.bfloat16), ((2, 4), (1, 4), (4, 8))):
    a = NMMatrix.from_dense(jnp.asarray(rng.standard_normal((1024, 256)), dtype), n, m, prune=True)
    x = jnp.asarray(rng.standard_normal((150, 1024)), dtype)
    y = jax.jit(lambda x, a: nm_matmul(x, a, backend="pallas"))(x, a).astype(jnp.float32)
    ref = x.astype(jnp.float32) @ a.to_dense().astype(jnp.float32)
    tol = 2e-2 * (float(jnp.abs(ref).max()) + 1)
    err = float(jnp.abs(y - ref).max())
    fails += err > tol
    print(f"nm {n}:{m} {jnp.dtype(dtype).name}: fwd err {err:.3g} (tol {tol:.3g}) "
          f"{'PASSED' if err <= tol else 'FAILED'}")
print(f"{fails} failed")
sys.exit(1 if fails else 0)
PYEOF
  TEST_RC=${PIPESTATUS[0]}
fi

# ---- 2. benchmark ---------------------------------------------------------------------------
"$PY" benchmarks/kernels.py --preset gpu --out "$OUTDIR/kernels_gpu.json" 2>&1 \
  | tee "$OUTDIR/kernels_gpu.log"
BENCH_RC=${PIPESTATUS[0]}

# ---- 3. one table ---------------------------------------------------------------------------
"$PY" - "$OUTDIR" "$TEST_RC" "$BENCH_RC" <<'PYEOF' | tee "$OUTDIR/gpu_check_table.txt"
import json, re, sys
from pathlib import Path
out, test_rc, bench_rc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
log = (out / "kernel_tests.log").read_text() if (out / "kernel_tests.log").exists() else ""
counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", log)}
print("=" * 78)
print("pallas_kernels GPU check:", (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "")
print(f"compiled kernel tests: rc={test_rc} {counts}")
results = []
if (out / "kernels_gpu.json").exists():
    data = json.loads((out / "kernels_gpu.json").read_text())
    results = data["results"]
    print(f"benchmark: {data['devices']} jax {data['jax']} (rc={bench_rc})")
else:
    print(f"benchmark: no results (rc={bench_rc})")
hdr = f"{'kind':<6} {'M':>5} {'K=N':>5} {'block':>5} {'sparse%':>7} {'dense_ms':>9} {'sparse_ms':>9} {'speedup':>8}  target"
print(hdr)
def target(r):
    if r["kind"] == "bsr" and r["sparsity"] == 0.0:
        return ">= 0.8x", r["speedup"] >= 0.8
    if r["kind"] == "bsr" and abs(r["sparsity"] - 0.9) < 1e-9:
        return ">= 6x", r["speedup"] >= 6.0
    if r["kind"].startswith("nm") and r["m"] <= 16:
        return ">= 1.5x", r["speedup"] >= 1.5
    return "", None
for r in results:
    t, ok = target(r)
    mark = "" if ok is None else ("PASS" if ok else "MISS")
    block = r["block"] if r["kind"] == "bsr" else "-"
    print(f"{r['kind']:<6} {r['m']:>5} {r['size']:>5} {block:>5} {100 * r['sparsity']:>7.0f} "
          f"{r['dense_ms']:>9.3f} {r['sparse_ms']:>9.3f} {r['speedup']:>7.2f}x  {t} {mark}")
print("=" * 78)
PYEOF
echo "gpu_check: outputs in $OUTDIR"
exit $(( TEST_RC != 0 || BENCH_RC != 0 ))
