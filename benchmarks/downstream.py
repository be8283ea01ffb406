"""Downstream on the tiny GPT: sparse pre-training on the standard library, fine-tuning on its
test files (sparse CE, sparse SquareHead, dense = SPDF), sparse model soups, export sizes.

    python benchmarks/downstream.py --workdir runs/downstream [--pretrain-steps 200]
        [--finetune-steps 100] [--ingredients 3] [--export-steps 20]

Every run is an ordinary run dir under WORKDIR (reused when complete, so a second call only
prints). Validation losses (± SE) on the test-files domain are measured on the same tokens:
the fine-tuning config's final evaluation set (``eval.final_batches``, ``eval.seed``; see
``soup.Evaluator``). Prints three tables.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sparsejax.downstream import export, loading, soup
from sparsejax.run import configlib, data, evaluation, experiment


def _finetune_config(init_from: Path, steps: int, **keys):
    c = configlib.base()
    c.data.source = "stdlib-tests"
    c.init_from = str(init_from)
    c.train.steps = steps
    c.train.lr = 1e-3
    c.train.warmup_steps = max(1, steps // 10)
    c.eval.every = c.checkpoint.every = steps
    c.eval.batches = 8
    for k, v in keys.items():
        configlib.set_key(c, k, v)
    return c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--ingredients", type=int, default=3)
    p.add_argument("--export-steps", type=int, default=20)
    p.add_argument("--sparsity", type=float, default=0.75)
    args = p.parse_args()
    root = Path(args.workdir)
    t0 = time.perf_counter()

    pre = configlib.base()  # configs/static_random.py: static random ERK
    for k, v in (("sparsity.method", "static"), ("sparsity.final", args.sparsity),
                 ("sparsity.score", "random"), ("sparsity.allocation", "erk"),
                 ("train.steps", args.pretrain_steps), ("eval.every", args.pretrain_steps),
                 ("train.warmup_steps", max(1, args.pretrain_steps // 10)),
                 ("checkpoint.every", args.pretrain_steps)):
        configlib.set_key(pre, k, v)
    experiment.run(pre, str(root / "pretrain"), progress=False)

    steps = args.finetune_steps
    dirs = {"sparse CE": root / "sparse_ce", "dense (SPDF)": root / "dense_spdf",
            "sparse SquareHead": root / "sparse_squarehead"}
    runs = {  # the SPDF dense fine-tune is also SquareHead's dense teacher (trained first)
        "sparse CE": _finetune_config(root / "pretrain", steps),
        "dense (SPDF)": _finetune_config(root / "pretrain", steps, **{"finetune.mode": "dense"}),
        "sparse SquareHead": _finetune_config(
            root / "pretrain", steps, **{"finetune.distill": "squarehead",
                                         "finetune.teacher": str(dirs["dense (SPDF)"])}),
    }
    for name, c in runs.items():
        experiment.run(c, str(dirs[name]), progress=False)

    ref = runs["sparse CE"]
    corpus = data.load_corpus("stdlib-tests")
    start = loading.load(root / "pretrain")
    evaluate = soup.Evaluator(start.model, ref, corpus)
    rows = [("pre-trained sparse, before", soup.mask_sparsity(start.masks),
             evaluate(start.params))]
    for name in runs:
        ld = loading.load(dirs[name])
        rows.append((name, soup.mask_sparsity(ld.masks) if ld.masks is not None else 0.0,
                     evaluate(ld.params)))
    print("\nfine-tuning on the standard library's test files (val loss ± SE, nats/byte)")
    print(f"{'model':<28} {'sparsity':>8} {'val_loss ± SE':>17}")
    for name, s, scored in rows:
        print(f"{name:<28} {s:>8.3f} {evaluation.format_loss(scored.loss, scored.se):>17}")

    soup_cfg = _finetune_config(root / "pretrain", steps,
                                **{"soup.ingredients": args.ingredients})
    result = soup.soup(soup_cfg, root / "soup")
    print("\nsparse model soups (same mask, seeds 0..m-1)")
    print(soup.table(result))

    print("\nexport sizes vs dense (whole model: packed values + index tables + dense leaves)")
    print(f"{'run':<26} {'format':<12} {'bytes':>9} {'dense':>9} {'ratio':>6}")
    exports = {
        "block-pruned (BSR 16x16)": ({"model.linear": "bsr", "model.block": 16,
                                      "sparsity.method": "static", "sparsity.score": "random",
                                      "sparsity.final": args.sparsity}, "bsr"),
        "2:4 (sparsity.method=nm)": ({"sparsity.method": "nm", "sparsity.n": 2,
                                      "sparsity.m": 4, "sparsity.update_every": 5}, "nm"),
    }
    for name, (keys, fmt) in exports.items():
        c = configlib.base()
        for k, v in {**keys, "train.steps": args.export_steps, "train.warmup_steps": 2,
                     "eval.every": args.export_steps,
                     "checkpoint.every": args.export_steps}.items():
            configlib.set_key(c, k, v)
        run_dir = root / f"export_{fmt}"
        experiment.run(c, str(run_dir), progress=False)
        for f in (fmt, "safetensors"):
            r = export.export_run(run_dir, f)
            size = r.path.stat().st_size
            print(f"{name:<26} {f:<12} {size:>9d} {r.dense_nbytes:>9d} "
                  f"{size / r.dense_nbytes:>6.3f}")
    try:
        export.export_run(root / "pretrain", "safetensors")
    except export.ExportRefused as e:
        print(f"unstructured {args.sparsity} (the pre-training run): {e}")
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
