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

from sparsejax.run import configlib


def get_config(arg=None):
    c = configlib.base()
    c.sparsity.method = "block"
    c.model.block = 32
    c.sparsity.final = 0.5
    c.sparsity.schedule = "window"
    c.sparsity.start = 0.25
    c.sparsity.end = 0.75
    c.sparsity.by = "compute"
    c.sparsity.kind = "geometric"
    c.sparsity.update_every = 10
    c.sparsity.score = "magnitude"
    c.sparsity.pooling = "l2"
    c.sparsity.allocation = "uniform"
    return configlib.apply_arg(c, arg)
