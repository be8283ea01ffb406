"""Sparse Model Soups (Zimmer et al. 2023, "Sparse Model Soups: A Recipe for Improved Pruning
via Model Averaging") of a pruned run, fine-tuned on the standard library's test files.

    sparsejax train --config configs/static_random.py:size=tiny --workdir runs/sparse
    sparsejax soup --config configs/soup.py:init_from=runs/sparse --workdir runs/soup

``soup.ingredients`` sparse fine-tunes (seeds config.seed + i, so different batch orders; the
mask of ``init_from`` kept exactly), then the uniform soup (mean of all) and the greedy soup
(best ingredient first; each next one joins only if the validation loss does not get worse).
``soup.cycles > 1`` prunes the ``soup.select`` soup again (``soup.prune_fraction`` of its
remaining weights, global magnitude) and repeats. Results: ``DIR/soup.json``; every
ingredient and soup is a run dir (``sparsejax.load``, ``sparsejax export``).
"""

from sparsejax.run import configlib


def get_config(arg=None):
    c = configlib.base()
    c.data.source = "stdlib-tests"
    c.finetune.mode = "sparse"
    c.soup.ingredients = 3
    c.train.steps = 100
    c.train.lr = 1e-3
    c.train.warmup_steps = 10
    c.eval.every = 100
    c.checkpoint.every = 100
    return configlib.apply_arg(c, arg)
