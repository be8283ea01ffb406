"""Gradual block-magnitude pruning of every dense kernel to 50% of its 32x32 blocks, in the
Journey Matters window; the result exports as BSR.

Block L2 norm (Narang et al. 2017, "Block-Sparse Recurrent Neural Networks", use the
block's max: sparsity.pooling=max); Zhu & Gupta 2017 / Jin et al. 2025 (gradual, geometric,
25%->75% of compute). The block is model.block (square), the one
``sparsejax export --format bsr RUN_DIR`` uses by default.

Command:   sparsejax train --config configs/block.py:size=tiny --workdir runs/block
           sparsejax export --format bsr runs/block
Time:      277 s wall for 300 steps on a 2-core CPU shared with 7 other jobs (load 10-20);
           the export: 0.579x the dense size (every prunable kernel half its blocks).
Result:    validation loss 2.170 ± 0.006 nats/byte at sparsity 0.5 (N_avg 86.0k of 116.5k).
"""

from pathlib import Path

from sparsejax.run import configlib
from sparsejax.sweep import load_recipe

# the schedule (25%->75% compute window, geometric, magnitude) is configs/gradual_magnitude.py's
GRADUAL, _ = load_recipe(str(Path(__file__).resolve().parent / "gradual_magnitude.py"))


def get_config(arg=None):
    c = GRADUAL.get_config()
    c.sparsity.method = "block"
    c.model.block = 32
    c.sparsity.pooling = "l2"
    c.sparsity.allocation = "uniform"
    return configlib.apply_arg(c, arg)
