"""SPDF in one run: static random ERK sparsity for the first 75% of training, dense after.

Thangarasa et al. 2023, "SPDF: Sparse Pre-training and Dense Fine-tuning for Large Language
Models" (``methods.spdf``): the pruned weights resume from exactly 0 with zero Adam moments at
the switch, and N_avg and the FLOP count follow the density change. (The two-run form,
sparse pre-training then dense fine-tuning from a checkpoint, is the downstream issue's.)

Command:   sparsejax train --config configs/spdf.py:size=tiny --workdir runs/spdf
Time:      31 s wall for 300 steps on an idle 2-core CPU (switch to dense at step 225).
Result:    validation loss 2.24 nats/byte, dense at the end (N_avg 61.2k of 116.5k); the same
           static recipe kept sparse reaches 2.26 (configs/static_random.py).
"""

from sparsejax.run import configlib


def get_config(arg=None):
    c = configlib.base()
    c.sparsity.method = "static"
    c.sparsity.final = 0.75
    c.sparsity.score = "random"
    c.sparsity.allocation = "erk"
    c.sparsity.dense_from = 0.75
    return configlib.apply_arg(c, arg)


def sweep(add):
    for dense_from in (0.5, 0.75, 1.0):
        add(**{"sparsity.dense_from": dense_from})
