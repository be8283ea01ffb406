"""Gradual global magnitude pruning in the Journey Matters window.

Jin et al. 2025, "The Journey Matters: Average Parameter Count over Pre-training Unifies Sparse
and Dense Scaling Laws": prune from 25% to 75% of the training compute (density-weighted), with
a geometric density schedule (pruning events every ``update_every`` steps) and one global
magnitude threshold across all attention and MLP kernels.

Command:   sparsejax train --config configs/gradual_magnitude.py:size=tiny --workdir runs/gm
Time:      measured 112 s wall (58 s CPU) for 300 steps on a busy 2-core CPU.
Result:    validation loss 2.15 nats/byte at final sparsity 0.5 (N_avg 85.9k of 116.5k).
"""

from sparsejax.run import configlib


def get_config(arg=None):
    c = configlib.base()
    c.sparsity.method = "gradual"
    c.sparsity.final = 0.5
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
    for size in ("tiny", "XS"):
        for final in (0.0, 0.25, 0.5, 0.75):
            for steps in (300, 600):
                add(**{"model.size": size, "sparsity.final": final, "train.steps": steps,
                       "sparsity.method": "gradual" if final else "dense"})
