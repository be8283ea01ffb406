"""SET: dynamic sparse training that drops the smallest weights and regrows at random.

Mocanu et al. 2018, "Scalable training of artificial neural networks with adaptive sparse
connectivity inspired by network science" (ERK random start, drop fraction 0.3 with cosine
decay, updates every 25 steps until 75% of training).

Command:   sparsejax train --config configs/set.py:size=tiny --workdir runs/set
Time:      36 s wall for 300 steps on a 2-core CPU shared with other jobs (load 3).
Result:    validation loss 2.25 nats/byte at sparsity 0.75 (N_avg 42.7k of 116.5k); RigL reaches
           2.29 and static random ERK 2.26 on this tiny model (configs/rigl.py). With the
           reference defaults (rounding="floor", grown weights held at 0 through their growing
           step): 2.2504 (re-run at load 15: 424 s wall).
"""

from sparsejax.run import configlib


def get_config(arg=None):
    c = configlib.base()
    c.sparsity.method = "set"
    c.sparsity.final = 0.75
    c.sparsity.allocation = "erk"
    c.sparsity.update_every = 25
    c.sparsity.end = 0.75
    return configlib.apply_arg(c, arg)
