"""Base config: a tiny dense GPT on the default corpus (the Python standard library's source).

Command:   sparsejax train --config configs/base.py:size=tiny --workdir runs/base
Time:      measured 82 s wall (39 s CPU) for 300 steps on a busy 2-core CPU.
Result:    validation loss 2.11 nats/byte (from 5.5 at init; measured with dense.py, same run).

Every key of every recipe is defined here (``sparsejax.run.configlib.base``); recipes change values.
``get_config("size=S,steps=1000")`` overrides keys (dotted, or the aliases size, steps and
final for sparsity.final).
"""

from sparsejax.run import configlib


def get_config(arg=None):
    return configlib.apply_arg(configlib.base(), arg)
