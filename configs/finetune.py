"""Fine-tune a pre-trained run on another domain: the standard library's test files.

SPDF across runs (Thangarasa et al. 2023, "SPDF: Sparse Pre-training and Dense Fine-tuning for
Large Language Models") is two commands, sparse pre-training on the default corpus (which
leaves the ``test``/``tests`` folders out), then this recipe on those folders
(``data.source="stdlib-tests"``)::

    sparsejax train --config configs/static_random.py:size=tiny --workdir runs/sparse
    sparsejax train --config configs/finetune.py:init_from=runs/sparse --workdir runs/ft

``finetune.mode``: ``sparse`` keeps the pre-training masks exactly (``methods.fixed``),
``dense`` trains every weight (pruned ones start at 0 with zero Adam moments: SPDF).
``finetune.distill=squarehead,finetune.teacher=RUN_DIR`` distills from a dense teacher run
(Kurtic et al. 2023). The ``model.*`` keys must be the ``init_from`` run's.
"""

from sparsejax.run import configlib


def get_config(arg=None):
    c = configlib.base()
    c.data.source = "stdlib-tests"
    c.finetune.mode = "sparse"
    c.train.steps = 100
    c.train.lr = 1e-3
    c.train.warmup_steps = 10
    c.eval.every = 50
    c.checkpoint.every = 50
    return configlib.apply_arg(c, arg)


def sweep(add):
    for mode in ("sparse", "dense"):
        add(**{"finetune.mode": mode})
