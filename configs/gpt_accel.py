"""Accelerator recipe: the GPT sizes sparse pre-training papers train, f32 weights, bf16 compute.

Sizes (``model.size``, :data:`sparsejax.models.gpt.VARIANTS`): the GPT-3 Small, Medium, Large
and XL shapes (Brown et al. 2020) that SPDF and Sparse-IFT (Thangarasa et al. 2023) train:
``125M`` (12 x 768), ``350M`` (24 x 1024), ``760M`` (24 x 1536), ``1.3B`` (24 x 2048, 16
heads). Params and the AdamW state stay float32; the forward and backward compute in bfloat16
(``model.dtype=bfloat16``). The vocabulary is the corpus's (256 bytes on the built-in corpus,
which holds 85M, 303M, 680M, 1.21B params at these shapes; a uint16 ``.bin`` of GPT-2 tokens,
``--config.data.source=tokens.bin``, gives its max token + 1). Learning rates are GPT-3's;
the batch is what one 80 GB GPU holds per step (no gradient accumulation), see the plans
below; block-sparse layers (``model.linear=bsr``) use 128x128 blocks (the CPU recipes' 32 is
too small to fill a GPU's or TPU's matrix units: README "Kernels"); steps are 20 tokens per
non-embedding parameter (Chinchilla), warm-up 2000 steps.

Command:   sparsejax train --config configs/gpt_accel.py:size=125M --workdir runs/g125m
           (``size=350M|760M|1.3B``; ``seq=2048`` for 2048-token windows; any other
           ``key=val`` as in every recipe, e.g. a sparse run:
           ``--config.sparsity.method=static --config.sparsity.final=0.75``)
Check:     sparsejax plan-memory --config configs/gpt_accel.py:size=1.3B --device h100
Hardware:  one 80 GB GPU (H100, A100-80GB); H200/B200 hold larger batches; on TPU v5e (16 GiB)
           use mesh.fsdp over several chips. `train` refuses a run that cannot fit up front.
Status:    NOT run on a GPU or TPU here. Only planned: XLA:CPU's compiled memory plan of the
           whole train step (``sparsejax plan-memory``), on abstract inputs; no time, loss or
           throughput has been measured.
"""

from sparsejax.models.gpt import GPTConfig
from sparsejax.run import configlib

# size -> (train.batch_size at seq 1024, train.lr): lr from GPT-3's Table 2.1; the batch is the
# largest power of 2 whose plan (XLA:CPU, bf16) leaves >= 10% of 80 GB free (docstring)
PRESETS = {
    "125M": (16, 6e-4),
    "350M": (8, 3e-4),
    "760M": (4, 2.5e-4),
    "1.3B": (4, 2e-4),
}
SEQS = (1024, 2048)
WARMUP_STEPS = 2000


def get_config(arg=None):
    """``arg``: ``size=125M|350M|760M|1.3B`` (default 125M; another variant of
    :data:`~sparsejax.models.gpt.VARIANTS` takes 125M's batch and lr), ``seq=1024|2048``
    (default 1024; 2048 quarters the batch: attention scores grow with seq**2), then any
    ``key=val`` of :func:`sparsejax.run.configlib.base`."""
    items = [s.strip() for s in (arg or "").split(",") if s.strip()]
    own = dict(s.split("=", 1) for s in items if s.split("=", 1)[0] in ("size", "seq"))
    rest = ",".join(s for s in items if s.split("=", 1)[0] not in ("size", "seq"))
    size, seq = own.get("size", "125M"), own.get("seq", "1024")
    shape = GPTConfig.from_variant(size)  # ValueError naming the sizes
    if not seq.isdigit() or int(seq) not in SEQS:
        raise ValueError(f"seq must be one of {SEQS}, got {seq!r}")
    seq_len = int(seq)
    preset = next((k for k in PRESETS if k.lower() == size.lower()), "125M")
    batch, lr = PRESETS[preset]
    batch = max(1, batch // (seq_len // 1024) ** 2)
    steps = max(100 * (WARMUP_STEPS // 100 + 1),
                round(20 * 12 * shape.n_layer * shape.d_model**2 / (batch * seq_len), -2))

    c = configlib.base()
    c.model.size = size
    c.model.n_ctx = seq_len
    c.model.dtype = "bfloat16"
    c.model.block = 128  # BSR blocks (model.linear=bsr): >= 64 fills the MMA units on GPU/TPU
    c.train.seq_len = seq_len
    c.train.batch_size = batch
    c.train.lr = lr
    c.train.steps = int(steps)
    c.train.warmup_steps = WARMUP_STEPS
    c.train.log_every = 50
    c.eval.every = 1000
    c.eval.batch_size = batch
    c.eval.final_batches = max(2, 3840 // batch // (seq_len // 128))
    c.checkpoint.every = 1000
    return configlib.apply_arg(c, rest)
