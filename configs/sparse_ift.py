"""Sparse-IFT: a GPT whose attention and MLP linears are replaced by iso-FLOP sparse layers.

Thangarasa et al. 2023, "Sparse Iso-FLOP Transformations for Maximizing Training Efficiency"
(``sparsejax.models.sparse_ift``): Sparse Wide, Parallel, Factorized or Doped at sparsity ``s``,
trained with RigL (Evci et al. 2020) at that same constant sparsity, as in the paper, with
uniform per-layer allocation so every transformed layer costs its dense layer's FLOPs.
Arguments: ``family`` (wide, parallel, factorized, doped; empty for the dense baseline) and
``sparsity`` (the Sparse-IFT ``s``, which also sets ``sparsity.final``), plus any dotted key
(``size=XS``; ``sparsity.method=static`` for static random masks, with ``model.linear=bsr``
for block-sparse kernel layers...).

Command:   sparsejax train --config configs/sparse_ift.py:family=wide,sparsity=0.75 \\
               --workdir runs/ift_wide
           sparsejax sweep --config configs/sparse_ift.py --workdir runs/ift  (dense + 4 x 2)
Time:      the masked layers compute densely on CPU (an s = 0.75 Wide step costs ~1.9x the
           dense step; on BSR kernels, model.linear=bsr, ~1.3x: benchmarks/sparse_ift.py).
           The 9-run sweep at 200 steps, seq 64 (--config.train.steps=200
           --config.train.seq_len=64 --config.model.n_ctx=64) took 356 s on a busy 2-core CPU.
Result:    at those settings (2 seeds), validation loss dense 2.347, Sparse Wide 2.273 (s=0.5)
           and 2.249 (s=0.75), Doped 2.342 / 2.384, Parallel 2.360 / 2.355, Factorized
           2.544 / 2.592 nats/byte (issue 13's closing note: FLOPs and seed spreads).
"""

from sparsejax.run import configlib

SPARSITIES = (0.5, 0.75)


def get_config(arg=None):
    c = configlib.base()
    family, s, rest = "wide", 0.75, []
    for item in (arg or "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "family":
            family = value.strip()
        elif key.strip() == "sparsity":
            try:
                s = float(value)
            except ValueError:
                raise ValueError("config argument sparsity must be a float in [0, 1) (the "
                                 f"Sparse-IFT sparsity), got {value.strip()!r}") from None
        elif item.strip():
            rest.append(item)
    c.model.sparse_ift.family = family
    c.model.sparse_ift.sparsity = s if family else 0.0
    c.sparsity.method = "rigl" if family and s > 0 else "dense"
    c.sparsity.final = c.model.sparse_ift.sparsity if c.sparsity.method != "dense" else 0.0
    c.sparsity.allocation = "uniform"
    c.sparsity.score = "random"  # for sparsity.method=static (and model.linear=bsr); RigL's own
    c.sparsity.update_every = 25
    c.sparsity.end = 0.75
    return configlib.apply_arg(c, ",".join(rest))


def sweep(add):
    """The iso-FLOP comparison: the dense model, then every family at s = 0.5 and 0.75."""
    add(**{"model.sparse_ift.family": "", "model.sparse_ift.sparsity": 0.0,
           "sparsity.method": "dense", "sparsity.final": 0.0})
    for family in ("wide", "parallel", "factorized", "doped"):
        for s in SPARSITIES:
            add(**{"model.sparse_ift.family": family, "model.sparse_ift.sparsity": s,
                   "sparsity.method": "rigl", "sparsity.final": s})
