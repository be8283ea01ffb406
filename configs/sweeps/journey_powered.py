"""Journey Matters, powered: 4 model sizes x 3 token budgets x {dense, gradual to 0.5, 0.75}.

Jin et al. 2025, "The Journey Matters: Average Parameter Count over Pre-training Unifies Sparse
and Dense Scaling Laws", tested the way the question is asked: fit ``L = E + A/N^a + B/D^b`` on
the dense runs only and predict the sparse runs with N = N_avg, N_final (non-zero count at the
end) or N_total (``sparsejax fit DIR --compare-n --holdout sparse``). 36 runs: the CPU sizes
nano / micro / tiny / mini (33.7k / 68.9k / 116k / 360k parameters) at 80 / 160 / 320 steps of
16 x 128 tokens (0.16M / 0.33M / 0.66M tokens), dense and pruned to 0.5 and 0.75 by gradual
global magnitude pruning in the 25%-75% compute window (configs/gradual_magnitude.py, pruning
every 5 steps so the shortest runs still prune 8 times): 4 dense N, 3 D, 12 distinct N_avg.

Power: every run is scored at its end on the same 14,336 windows of 128 tokens
(``eval.final_batches=896`` x 16) of the validation split (every 3rd file, 3.36M tokens). The
per-window loss has a standard deviation of ~0.41-0.46 nats, so ``val_loss_se`` (each
summary.json; :func:`sparsejax.run.evaluation.summarize`: std / sqrt(n)) is ~0.0034-0.0038,
<= 0.2% of every loss above 1.9 -- the sparse runs here end above 2.0. The windows are the same
for all runs, so differences between runs are measured more precisely still (paired).
Sized for a contended 2-core CPU: the final eval costs as much as the training of the larger
runs, which is why the budgets stop at 320 steps.

Command:   sparsejax sweep --config configs/sweeps/journey_powered.py \\
               --workdir runs/journey_powered --parallel 1
Time:      measured 57m46s wall (36/36 completed) with --parallel 1 on a 2-core CPU shared
           with other jobs (load 4-18); the run processes used 1,743 CPU s in all (3,242 s of
           their wall). Final losses 2.000 (mini dense, 320 steps) to 2.970 (nano at 0.75, 80
           steps), SE 0.12-0.19% (sparse runs <= 0.18%).
Result:    `sparsejax fit DIR --holdout sparse --compare-n` (fit the 12 dense runs, predict the
           24 sparse ones): RMSE of log loss 0.0237 with N_avg, 0.0312 with N_total, 0.0468
           with N_final; the dense fit's E is not identified (flagged degenerate) and its
           in-sample RMSE is 1.2%. README "Scaling laws" has the table and the caveats.
"""

from pathlib import Path

from sparsejax.run import configlib
from sparsejax.sweep import load_recipe

SIZES = ("nano", "micro", "tiny", "mini")
STEPS = (80, 160, 320)
# journey_tiny's recipe (gradual global magnitude, every 3rd file for validation) and grid,
# with shorter budgets: an earlier warm-up, pruning every 5 steps, a smaller final eval
TINY, _ = load_recipe(str(Path(__file__).with_name("journey_tiny.py")))


def get_config(arg=None):
    c = TINY.get_config()
    c.train.warmup_steps = 16
    c.sparsity.update_every = 5
    c.eval.every = 80
    c.eval.final_batches = 896
    c.checkpoint.every = 80
    return configlib.apply_arg(c, arg)


def sweep(add):
    TINY.grid(add, SIZES, STEPS)
