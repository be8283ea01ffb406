"""Unstructured straight-through magnitude pruning at 50%: dense weights, masked forward.

Bengio et al. 2013 (the straight-through estimator); Zhou et al. 2021 (STE for sparse masks);
JaxPruner's SteMagnitudePruning (Lee et al. 2023): the top-50% |W| of every kernel forward,
recomputed each step, the gradient to every weight.

Command:   sparsejax train --config configs/ste_unstructured.py:size=tiny --workdir runs/ste_u
Time:      (filled in below from the recorded run)
Result:    (filled in below from the recorded run)
"""

from sparsejax.run import configlib


def get_config(arg=None):
    c = configlib.base()
    c.sparsity.method = "ste_unstructured"
    c.sparsity.final = 0.5
    c.sparsity.score = "magnitude"
    c.sparsity.allocation = "uniform"
    return configlib.apply_arg(c, arg)
