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
Time:      estimated ~18-20 min on an idle 2-core CPU, ~45-50 min on this shared one (load 5),
           from measured runs (parallel 2, one core each; CPU s / process wall s under load):
           nano 150 steps dense 39 / 95, tiny 300 steps to 0.5 60 / 137, mini 600 steps dense
           171 / 340 (loss 1.6883 +- 0.0031, 0.18%). Model: CPU s per run ~ a + b * steps with
           (a, b) = (30, 0.058) nano, (38, 0.07) tiny, (55, 0.19) mini, +10% train for sparse
           runs; sum over the 27 runs ~2,180 CPU s, halved by --parallel 2 (longest runs first).
"""

from sparsejax import configlib

SIZES = ("nano", "tiny", "mini")
STEPS = (150, 300, 600)
FINALS = (0.0, 0.5, 0.75)  # 0.0: the dense baseline


def get_config(arg=None):
    c = configlib.base()
    c.data.val_fraction = 1 / 3
    c.eval.every = 100
    c.eval.batches = 2
    c.eval.final_batches = 1536
    c.checkpoint.every = 100
    c.checkpoint.keep = 1
    c.sparsity.schedule = "window"
    c.sparsity.start = 0.25
    c.sparsity.end = 0.75
    c.sparsity.by = "compute"
    c.sparsity.kind = "geometric"
    c.sparsity.update_every = 10
    c.sparsity.score = "magnitude"
    c.sparsity.allocation = "global"
    return configlib.apply_arg(c, arg)


def sweep(add):
    for size in SIZES:
        for steps in STEPS:
            for final in FINALS:
                add(**{"model.size": size, "train.steps": steps, "sparsity.final": final,
                       "sparsity.method": "gradual" if final else "dense"})
