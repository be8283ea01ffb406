"""AC/DC at 50%: dense warm-up, alternating 30-step sparse and dense phases, final sparse
fine-tune over the last 60 steps (with the sparse phase before it: steps 210-299).

Peste et al. 2021, "AC/DC: Alternating Compressed/DeCompressed Training of Deep Neural
Networks" (magnitude masks recomputed at the start of every sparse phase).

Command:   sparsejax train --config configs/acdc.py:size=tiny --workdir runs/acdc
Time:      336 s wall for 300 steps on a 2-core CPU shared with 7 other jobs (load 10-20).
Result:    validation loss 2.169 ± 0.006 nats/byte at final sparsity 0.5 (N_avg 87.0k of
           116.5k); the dense recipe reached 2.115 on the same machine and day.
"""

from sparsejax.run import configlib


def get_config(arg=None):
    c = configlib.base()
    c.sparsity.method = "acdc"
    c.sparsity.final = 0.5
    c.sparsity.score = "magnitude"
    c.sparsity.allocation = "uniform"
    c.sparsity.acdc.warmup_steps = 30
    c.sparsity.acdc.dense_steps = 30
    c.sparsity.acdc.sparse_steps = 30
    c.sparsity.acdc.finetune_steps = 60
    return configlib.apply_arg(c, arg)
