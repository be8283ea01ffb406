"""1:8 N:M sparsity with mask-decay gradient flow (MDGF, linear decay).

Bambhaniya et al. 2024, "Progressive Gradient Flow for Robust N:M Sparsity Training in
Transformers".

Command:   sparsejax train --config configs/mdgf.py:size=tiny --workdir runs/mdgf
Time:      47 s wall for 300 steps on a 2-core CPU shared with other jobs (load 5).
Result:    validation loss 2.27 nats/byte at 1:8 (beta_t = 1 - 0.005 t reaches 0 at step 200;
           hard masks from step 270; N_avg 30.5k of 116.5k).
"""

from sparsejax.run import configlib


def get_config(arg=None):
    c = configlib.base()
    c.sparsity.method = "mdgf"
    c.sparsity.n = 1
    c.sparsity.m = 8
    c.sparsity.alpha = 0.005
    c.sparsity.decay_kind = "linear"
    c.sparsity.hard_from = 0.9
    return configlib.apply_arg(c, arg)
