"""A 12-run Journey-Matters-style sweep for trying the loop sweep -> fit -> plan in minutes.

The small sibling of ``journey_tiny.py`` (same data split, evaluation set and pruning recipe:
gradual global magnitude pruning, geometric, in the window from 25% to 75% of the compute;
Jin et al. 2025): the dense nano / micro / tiny models (33.7k / 68.9k / 116k parameters) at
50 / 100 / 200 steps of 16 x 128 tokens (0.10M / 0.20M / 0.41M tokens), plus each size pruned
to 0.75 at 200 steps: 3 distinct D and 6 distinct N_avg, enough for the 5-parameter law.
Every run is scored at its end on the same 12,288 windows of the validation split (half of
``journey_tiny``'s: these losses stay above 2.2, where ``val_loss_se`` ~0.0035 is < 0.16%).

Command:   sparsejax sweep --config configs/sweeps/journey_quick.py --workdir runs/journey_quick \\
               --parallel 2
Time:      measured 8m29s wall with --parallel 2 on a shared 2-core CPU (load average ~5;
           the 12 workers used 383 CPU s in all, ~3.5 min of wall on an idle 2-core machine).
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("journey_tiny",
                                               Path(__file__).with_name("journey_tiny.py"))
journey_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(journey_tiny)

SIZES = ("nano", "micro", "tiny")
STEPS = (50, 100, 200)


def get_config(arg=None):
    from sparsejax.run import configlib

    c = journey_tiny.get_config()
    c.train.warmup_steps = 10
    c.eval.final_batches = 768
    c.eval.every = 50
    c.checkpoint.every = 50
    return configlib.apply_arg(c, arg)


def sweep(add):
    for size in SIZES:
        for steps in STEPS:
            add(**{"model.size": size, "train.steps": steps, "sparsity.method": "dense",
                   "sparsity.final": 0.0})
        add(**{"model.size": size, "train.steps": STEPS[-1], "sparsity.method": "gradual",
               "sparsity.final": 0.75})
