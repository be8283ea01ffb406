"""2:4 N:M sparsity trained from scratch with SR-STE.

Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch".

Command:   sparsejax train --config configs/sr_ste.py:size=tiny --workdir runs/sr_ste
Time:      47 s wall for 300 steps on a 2-core CPU shared with other jobs (load 5).
Result:    validation loss 2.27 nats/byte with 2:4 forward weights (N_avg 67.3k of 116.5k);
           dense reaches about 2.1 in the same steps (benchmarks/methods_compare.py).
"""

from sparsejax.run import configlib


def get_config(arg=None):
    c = configlib.base()
    c.sparsity.method = "sr_ste"
    c.sparsity.n = 2
    c.sparsity.m = 4
    c.sparsity.decay = 2e-4
    return configlib.apply_arg(c, arg)
