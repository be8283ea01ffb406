"""Every training method on one tiny GPT, one token budget, the default corpus (issue 12).

Part 1 trains each recipe (``configs/*.py``) for ``--steps`` steps in its own run dir and
reports final validation loss, training FLOPs, N_avg and the mean step time against dense.
Part 2 times single train steps side by side (interleaved rounds, one process): the dense
step, a RigL *update* step (drop/grow at every timed step) and the straight-through N:M steps
(SR-STE 2:4, MDGF 1:8), whose masks are recomputed every step; target <= 2x dense.

    JAX_PLATFORMS=cpu python benchmarks/methods_compare.py [--steps 300] [--rounds 10]
        [--recipes ste_unstructured,channels,block,acdc]   # these (and dense) only

Recorded for the issue 27 rows (``--part train --recipes ste_unstructured,channels,block,acdc``;
tiny GPT, 300 steps, a 2-core CPU shared with 7 other jobs at load 10-20, so the step times,
dense's first under the heaviest load, do not compare; the losses are deterministic and equal
the recipes' own runs):

    method                         val loss  train FLOPs    N_avg  N_final
    dense                            2.1149    5.436e+11   116480   116480
    STE unstructured 0.5             2.3102    3.624e+11    67328    67328
    channels (MLP 0.5, window)       2.1189    4.684e+11    96090    83712
    block 32x32 (0.5, window)        2.1702    4.310e+11    85951    67328
    AC/DC 0.5                        2.1688    4.349e+11    86989    67328

and ``--part steps --rounds 3 --reps 3`` (same machine, interleaved rounds): dense 158.7 ms,
RigL update step 1.08x, 2:4 SR-STE 0.89x, 1:8 MDGF 1.08x, STE unstructured 0.5 1.10x (its
exact top-k mask recomputed every step).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.run import accounting, data, experiment, rundir
from sparsejax.run.step import TrainState, make_train_step

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {  # name -> (recipe file, extra overrides)
    "dense": ("dense", {}),
    "gradual (window, global)": ("gradual_magnitude", {}),
    "static (random ERK 0.75)": ("static_random", {}),
    "RigL 0.75": ("rigl", {}),
    "SET 0.75": ("set", {}),
    "SPDF (static 0.75 -> dense)": ("spdf", {}),
    "2:4 SR-STE": ("sr_ste", {}),
    "1:8 MDGF": ("mdgf", {}),
    "STE unstructured 0.5": ("ste_unstructured", {}),
    "channels (MLP 0.5, window)": ("channels", {}),
    "block 32x32 (0.5, window)": ("block", {}),
    "AC/DC 0.5": ("acdc", {}),
}


def load(name: str, steps: int):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("size=tiny")
    c.train.steps = steps
    c.eval.every = steps
    c.checkpoint.every = steps
    return c


def train_all(steps: int, workdir: Path, only: set[str] | None = None) -> dict[str, dict]:
    out = {}
    for label, (name, extra) in RECIPES.items():
        if only is not None and name not in only | {"dense"}:
            continue
        c = load(name, steps)
        for k, v in extra.items():
            setattr(c.sparsity, k, v)
        t = time.perf_counter()
        summary = experiment.run(c, str(workdir / name), progress=False)
        records = rundir.read_metrics(workdir / name)
        out[label] = {**summary, "wall": time.perf_counter() - t,
                      "step_ms": 1e3 * float(np.mean([r["step_time_s"] for r in records[1:]]))}
        print(f"  {label}: val {summary['final_val_loss']:.4f} ({out[label]['wall']:.0f} s)",
              flush=True)
    return out


def step_timings(rounds: int, reps: int) -> dict[str, float]:
    """Median ms of one jitted train step per method, interleaved with dense."""
    corpus = data.load_corpus(None)
    steps = {}
    for label, name in (("dense", "dense"), ("RigL update step", "rigl"),
                        ("2:4 SR-STE", "sr_ste"), ("1:8 MDGF", "mdgf"),
                        ("STE unstructured 0.5", "ste_unstructured")):
        c = load(name, 1000)
        if name == "rigl":
            c.sparsity.update_every = 1  # every timed step drops and grows
            c.sparsity.end = 1.0
        exp = experiment.build(c)
        graphdef, params_state, rest = nnx.split(exp.model, nnx.Param, ...)
        params_def = jax.tree_util.tree_structure(params_state)
        params = nnx.to_pure_dict(params_state)
        opt_state = exp.tx.init(params)
        sparse = name != "dense"
        fn = make_train_step(graphdef, params_def, rest, exp.tx, fixed_flops=0.0,
                             dense_flops=0.0, tokens_per_step=1.0, sparse=sparse,
                             structural=accounting.structural_stats(exp.model, params))
        def zero():  # a fresh buffer each: the step donates its state
            return jnp.zeros((), jnp.float32)

        state = TrainState(jnp.int32(1), params, opt_state, jax.random.PRNGKey(0), zero(),
                           zero(), zero(), jnp.int32(0))
        x, y = data.get_batch(corpus.train, seed=0, step=0, batch_size=c.train.batch_size,
                              seq_len=c.train.seq_len)
        state, _ = fn(state, x, y)
        jax.block_until_ready(state.params)
        steps[label] = [fn, state, x, y, []]
    for r in range(rounds):
        for label in (list(steps) if r % 2 else list(steps)[::-1]):
            fn, state, x, y, ts = steps[label]
            t = time.perf_counter()
            for _ in range(reps):
                state, _ = fn(state, x, y)
            jax.block_until_ready(state.params)
            ts.append((time.perf_counter() - t) / reps)
            steps[label][1] = state
    return {k: statistics.median(v[4]) for k, v in steps.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--part", choices=("both", "train", "steps"), default="both")
    ap.add_argument("--recipes", default=None,
                    help="comma-separated recipe files (configs/NAME.py) to train, with dense")
    args = ap.parse_args()
    if args.part != "steps":
        train_table(args)
    if args.part != "train":
        steps_table(args)


def train_table(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        only = set(args.recipes.split(",")) if args.recipes else None
        unknown = (only or set()) - {name for name, _ in RECIPES.values()}
        if unknown:
            raise SystemExit(f"--recipes: unknown {sorted(unknown)}")
        print(f"training {len(only) + 1 if only else len(RECIPES)} recipes, tiny GPT, "
              f"{args.steps} steps each", flush=True)
        res = train_all(args.steps, Path(tmp), only)
    dense = res["dense"]
    print(f"\n{'method':<30}{'val loss':>9}{'train FLOPs':>13}{'N_avg':>9}{'N_final':>9}"
          f"{'step ms':>9}{'vs dense':>9}")
    for label, r in res.items():
        print(f"{label:<30}{r['final_val_loss']:>9.4f}{r['flops']:>13.3e}{r['n_avg']:>9.0f}"
              f"{r['n_active']:>9d}{r['step_ms']:>9.1f}{r['step_ms'] / dense['step_ms']:>8.2f}x")
    print("\n(step ms: mean over the run's logged intervals, masks updates and evals included)")


def steps_table(args: argparse.Namespace) -> None:
    t = step_timings(args.rounds, args.reps)
    print(f"\n{'single train step':<22}{'median ms':>10}{'vs dense':>10}{'target':>8}")
    for label, v in t.items():
        ratio = v / t["dense"]
        target = "" if label == "dense" else ("<=2x " + ("PASS" if ratio <= 2 else "FAIL"))
        print(f"{label:<22}{v * 1e3:>10.2f}{ratio:>9.2f}x  {target}")


if __name__ == "__main__":
    main()
