"""Static random pruning at initialization with ERK allocation (the sparse phase of SPDF).

Evci et al. 2020 (ERK); Liu et al. 2022, "The Unreasonable Effectiveness of Random Sparse
Training"; Thangarasa et al. 2023, "SPDF: Sparse Pre-training and Dense Fine-tuning".

Command:   sparsejax train --config configs/static_random.py:size=tiny --workdir runs/sr
Time:      measured 61 s wall (46 s CPU) for 300 steps on a busy 2-core CPU.
Result:    validation loss 2.26 nats/byte at sparsity 0.75 (N_avg 42.7k of 116.5k).

``model.linear=bsr`` (with ``model.block``) trains the same recipe on the block-sparse Pallas
kernels (``pallas_kernels.layers.BSRLinear``) with a static random block mask instead.
"""

from sparsejax.run import configlib


def get_config(arg=None):
    c = configlib.base()
    c.sparsity.method = "static"
    c.sparsity.final = 0.75
    c.sparsity.score = "random"
    c.sparsity.allocation = "erk"
    return configlib.apply_arg(c, arg)


def sweep(add):
    for final in (0.5, 0.75, 0.9):
        add(**{"sparsity.final": final})
