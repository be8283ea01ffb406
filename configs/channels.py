"""Gradual channel pruning of the MLP neurons: half of every fc_in's output channels and the
matching fc_out rows, in the Journey Matters window.

Li et al. 2017, "Pruning Filters for Efficient ConvNets" (a norm of a channel's weights ranks
it; L2 here, L1 there); Zhu & Gupta 2017 / Jin et al. 2025 (gradual, geometric, 25%->75%
of compute).
Attention projections stay dense (their channels are head dimensions): the weight sparsity of
the prunable kernels is 0.5 x 2/3 = 1/3.

Command:   sparsejax train --config configs/channels.py:size=tiny --workdir runs/channels
Time:      344 s wall for 300 steps on a 2-core CPU shared with 7 other jobs (load 10-20).
Result:    validation loss 2.119 ± 0.006 nats/byte at weight sparsity 0.333 (128 of 256
           neurons per block, N_avg 96.1k of 116.5k); the dense recipe reached 2.115 on the
           same machine and day.
"""

from pathlib import Path

from sparsejax.run import configlib
from sparsejax.sweep import load_recipe

# the schedule (25%->75% compute window, geometric, magnitude) is configs/gradual_magnitude.py's
GRADUAL, _ = load_recipe(str(Path(__file__).resolve().parent / "gradual_magnitude.py"))


def get_config(arg=None):
    c = GRADUAL.get_config()
    c.sparsity.method = "channels"
    c.sparsity.final = 0.5  # of each fc_in's channels
    c.sparsity.allocation = "uniform"
    return configlib.apply_arg(c, arg)
