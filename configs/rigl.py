"""RigL: dynamic sparse training; drop the smallest weights, grow the largest dense gradients.

Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners" (ERK random start,
drop fraction 0.3 with cosine decay, updates every 25 steps until 75% of training).

Command:   sparsejax train --config configs/rigl.py:size=tiny --workdir runs/rigl
Time:      41 s wall for 300 steps on a 2-core CPU shared with other jobs (load 3).
Result:    validation loss 2.29 nats/byte at sparsity 0.75 (N_avg 42.7k of 116.5k); static random
           ERK at the same sparsity reaches 2.26, SET 2.25 (configs/static_random.py, set.py).
           With the reference defaults (rounding="floor", grown weights held at 0 through their
           growing step): 2.2851 (re-run at load 15: 304 s wall).
"""

from sparsejax.run import configlib


def get_config(arg=None):
    c = configlib.base()
    c.sparsity.method = "rigl"
    c.sparsity.final = 0.75
    c.sparsity.allocation = "erk"
    c.sparsity.update_every = 25
    c.sparsity.end = 0.75
    return configlib.apply_arg(c, arg)
