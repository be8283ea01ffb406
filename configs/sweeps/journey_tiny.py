"""Journey Matters at CPU scale: 3 model sizes x 3 token budgets x {dense, gradual to 0.5, 0.75}.

Jin et al. 2025, "The Journey Matters: Average Parameter Count over Pre-training Unifies Sparse
and Dense Scaling Laws": gradual global magnitude pruning in the window from 25% to 75% of the
training compute (density-weighted), geometric density schedule, against dense runs of the same
budgets; the law ``L = E + A/N^a + B/D^b`` is fitted with N = N_avg. Here: 27 runs, model sizes
nano / tiny / mini (33.7k / 116k / 360k parameters), 150 / 300 / 600 steps of 16 x 128 tokens
(0.31M / 0.61M / 1.23M tokens), so 3 distinct D and, with the sparse runs, 9 distinct N_avg.

Evaluation fit for a law: the validation split is every 3rd file (``data.val_fraction=1/3``,
3.36M tokens of the default corpus) and every run is scored at its end on the same 24,576
disjoint 128-token windows (``eval.final_batches=1536`` x 16, drawn with ``eval.seed``). The
per-window loss has a standard deviation of about 0.46 nats, so ``val_loss_se`` (in each
summary.json) is about 0.0029, <= 0.2% of any loss above 1.47 (the 600-step runs reach ~1.7).

Command:   sparsejax sweep --config configs/sweeps/journey_tiny.py --workdir runs/journey_tiny \\
               --parallel 2
Time:      measured 31 min wall (exit 0, 27/27 completed) with --parallel 2 on a 2-core CPU
           shared with other jobs (load ~5); the workers used 2,142 CPU s in all, so about
           18-20 min on an idle 2-core machine. Final losses 1.688 (mini dense, 600 steps) to
           2.691 (nano at 0.75, 150 steps), each +- 0.0025-0.0031 (<= 0.18%).
Result:    `sparsejax fit DIR --compare-n`: N_avg fits best (RMSE of log loss 0.0098 vs 0.0154
           for the final non-zero count and 0.0212 for the total); E is not identified at this
           scale (flagged degenerate: it sits on its lower bound); with --fix E=1 the N_avg law
           has alpha 0.47 [0.32, 0.61], beta 0.46 [0.39, 0.61] (1,000-replicate bootstrap).
"""

from pathlib import Path

from sparsejax.run import configlib
from sparsejax.sweep import load_recipe

SIZES = ("nano", "tiny", "mini")
STEPS = (150, 300, 600)
FINALS = (0.0, 0.5, 0.75)  # 0.0: the dense baseline
# the pruning recipe (25%->75% compute window, geometric, global magnitude) is the one of
# configs/gradual_magnitude.py; each run sets its own sparsity.method and sparsity.final
GRADUAL, _ = load_recipe(str(Path(__file__).resolve().parents[1] / "gradual_magnitude.py"))


def get_config(arg=None):
    c = GRADUAL.get_config()
    c.data.val_fraction = 1 / 3
    c.eval.every = 100
    c.eval.batches = 2
    c.eval.final_batches = 1536
    c.checkpoint.every = 100
    c.checkpoint.keep = 1
    return configlib.apply_arg(c, arg)


def grid(add, sizes=SIZES, steps=STEPS, finals=FINALS):
    """Every size x step budget x final sparsity (0.0: a dense run)."""
    for size in sizes:
        for n in steps:
            for final in finals:
                add(**{"model.size": size, "train.steps": n, "sparsity.final": final,
                       "sparsity.method": "gradual" if final else "dense"})


def sweep(add):
    grid(add)
