"""Memory plans of the accelerator presets' train steps, as a markdown table (no device).

For each size of ``configs/gpt_accel.py``, compute dtype (float32, bfloat16) and, where the
schema has ``model.remat``, each of its settings: XLA's compiled memory plan of the whole train
step on abstract inputs (:func:`sparsejax.run.memory.plan`, the same numbers as
``sparsejax plan-memory``), per device, in GB (1e9 bytes), and whether it fits an 80 GB H100.
On a CPU host these are XLA:CPU's plans, estimates of an accelerator's (module docstring of
:mod:`sparsejax.run.memory`). About 10-40 s of compiling per row on a 2-core CPU.

    python benchmarks/memory_plans.py [--sizes 125M,1.3B] [--remat none,dots_saveable,full]
        [--config.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from sparsejax.run import configlib, memory
from sparsejax.run.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
H100 = 80 * 10**9


def recipe(arg: str):
    spec = importlib.util.spec_from_file_location("gpt_accel", ROOT / "configs" / "gpt_accel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="125M,1.3B")
    p.add_argument("--remat", default=None, help="model.remat values (default: all, if the "
                   "schema has model.remat)")
    args, overrides = p.parse_known_args(argv)
    has_remat = hasattr(ModelSpec(), "remat")  # model.remat, once the schema has it
    remats = (args.remat.split(",") if args.remat else ["none", "dots_saveable", "full"]
              ) if has_remat else [None]
    print("| size | dtype | remat | batch x seq | params | opt state | masks | temporaries "
          "| peak | autodiff activations | H100 80 GB | compile s |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for size in args.sizes.split(","):
        for dtype in ("float32", "bfloat16"):
            for remat in remats:
                c = recipe(f"size={size}")
                c.model.dtype = dtype
                if remat is not None:
                    c.model.remat = remat
                for item in overrides:
                    key, value = item.removeprefix("--config.").split("=", 1)
                    configlib.set_key(c, key, value)
                spec = configlib.validate(c)
                plan = memory.plan(spec, memory.corpus_vocab(spec))
                s, gb = plan.state, (lambda n: f"{n / 1e9:.2f}")
                print(f"| {size} | {dtype} | {remat or '-'} | {spec.train.batch_size} x "
                      f"{spec.train.seq_len} | {gb(s.params)} | {gb(s.opt_state)} | "
                      f"{gb(s.masks)} | {gb(plan.temporaries)} | {gb(plan.peak)} | "
                      f"{gb(plan.residuals)} | {'fits' if plan.peak <= H100 else 'NO'} | "
                      f"{plan.compile_s:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
