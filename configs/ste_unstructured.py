"""Unstructured straight-through magnitude pruning at 50%: dense weights, masked forward.

Bengio et al. 2013 (the straight-through estimator); Zhou et al. 2021 (STE for sparse masks);
JaxPruner's SteMagnitudePruning (Lee et al. 2023): the top-50% |W| of every kernel forward,
recomputed each step, the gradient to every weight.

Command:   sparsejax train --config configs/ste_unstructured.py:size=tiny --workdir runs/ste_u
Time:      324 s wall for 300 steps (command above, /tmp run dir) on a 2-core CPU shared
           with 7 other jobs (load 10-20).
Result:    validation loss 2.310 ± 0.007 nats/byte, forward sparsity 0.5 (N_avg 67.3k of
           116.5k: STE forward weights from step 0).
"""

from sparsejax.run import configlib


def get_config(arg=None):
    c = configlib.base()
    c.sparsity.method = "ste_unstructured"
    c.sparsity.final = 0.5
    c.sparsity.score = "magnitude"
    c.sparsity.allocation = "uniform"
    return configlib.apply_arg(c, arg)
