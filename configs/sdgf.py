"""1:8 N:M sparsity reached through stepwise structure decay (SDGF, 7:8 -> 4:8 -> 2:8 -> 1:8).

Bambhaniya et al. 2024, "Progressive Gradient Flow for Robust N:M Sparsity Training in
Transformers".

Command:   sparsejax train --config configs/sdgf.py:size=tiny --workdir runs/sdgf
Time:      50 s wall for 300 steps on a 2-core CPU shared with other jobs (load 5).
Result:    validation loss 2.31 nats/byte at 1:8 (frames 7:8, 4:8, 2:8, 1:8 start at steps 0,
           68, 135, 202; hard masks from step 270; N_avg 58.2k of 116.5k).
"""

from sparsejax.run import configlib


def get_config(arg=None):
    c = configlib.base()
    c.sparsity.method = "sdgf"
    c.sparsity.n = 1
    c.sparsity.m = 8
    c.sparsity.frames = 4
    c.sparsity.pattern = "stepwise"
    c.sparsity.hard_from = 0.9
    return configlib.apply_arg(c, arg)
