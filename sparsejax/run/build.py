"""Config -> the objects a run is made of: model config, schedules, mask method, optimizer,
linear factory. Pure construction (no I/O, no data, no weights): :func:`check` builds them all
to validate a config before anything is loaded.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import ml_collections
import optax

from pallas_kernels.layers import bsr_linear_factory
from sparsejax import methods, schedules
from sparsejax.models import sparse_ift
from sparsejax.models.gpt import GPTConfig
from sparsejax.models.layers import dense_linear
from sparsejax.run import configlib
from sparsejax.transforms import sparsify


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> GPTConfig:
    """The model's :class:`GPTConfig` (``model.size`` decoded by ``GPTConfig.from_variant``)."""
    m = config.model
    cfg = GPTConfig.from_variant(
        m.size, n_ctx=m.n_ctx, pos=m.pos, tie_embeddings=m.tie_embeddings, dtype=m.dtype,
        vocab_size=vocab_size,
    )
    if m.sparse_ift.family == "wide":  # Sparse Wide: widened model, linears at sparsity s
        cfg = sparse_ift.widen(cfg, m.sparse_ift.sparsity,
                               block=m.block if m.linear == "bsr" else None)
    return cfg


def _wide_dims(config: ml_collections.ConfigDict) -> tuple[GPTConfig, GPTConfig] | None:
    """``(dense, widened)`` model configs of a Sparse Wide run, else ``None``."""
    m = config.model
    if m.sparse_ift.family != "wide" or config.sparsity.final == 0:
        return None
    dense = GPTConfig.from_variant(m.size, n_ctx=m.n_ctx, pos=m.pos)
    return dense, sparse_ift.widen(dense, m.sparse_ift.sparsity,
                                   block=m.block if m.linear == "bsr" else None)


def target_sparsity(config: ml_collections.ConfigDict) -> float:
    """The total sparsity the mask method trains at: ``sparsity.final``, except under Sparse
    Wide, whose widths are rounded up: there it is :func:`sparsejax.models.sparse_ift.wide_sparsity`
    (slightly above ``s``), and each layer gets its own iso-FLOP share (:func:`allocation`)."""
    dims = _wide_dims(config)
    if dims is None:
        return config.sparsity.final
    dense, wide = dims
    return sparse_ift.wide_sparsity(dense.d_model, dense.d_ff, wide.d_model, wide.d_ff)


def allocation(config: ml_collections.ConfigDict) -> Any:
    """``sparsity.allocation``, or under Sparse Wide the per-layer iso-FLOP selection
    (:func:`sparsejax.models.sparse_ift.wide_selection`)."""
    dims = _wide_dims(config)
    if dims is None:
        return config.sparsity.allocation
    dense, wide = dims
    return sparse_ift.wide_selection(sparse_ift.wide_layer_sparsity(
        dense.d_model, dense.d_ff, wide.d_model, wide.d_ff))


def sparsity_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule | None:
    """The target-sparsity schedule of a static or gradual config (``None`` otherwise: dense
    runs, and methods whose target comes from their own definition, e.g. N:M)."""
    s, steps = config.sparsity, config.train.steps
    if s.method not in ("static", "gradual"):  # dense, or a method with its own targets
        return None
    if s.method == "static":
        return schedules.constant(target_sparsity(config), update_every=steps + 1)  # from 0
    if s.schedule == "window":
        return schedules.window(
            steps, s.final, start=s.start, end=s.end, kind=s.kind, by=s.by,
            update_every=s.update_every,
        )
    if s.schedule == "polynomial":
        return schedules.polynomial(s.final, s.begin_step, s.end_step,
                                    update_every=s.update_every)
    if s.schedule == "geometric":
        return schedules.geometric(s.final, s.begin_step, s.end_step,
                                   update_every=s.update_every)
    return schedules.constant(s.final, update_every=s.update_every)


def linear_factory(config: ml_collections.ConfigDict):
    """The model's linear-layer factory: dense, or BSR kernels with a static block mask; a
    Sparse-IFT family (``model.sparse_ift``) builds its layers from that one."""
    m = config.model
    if m.linear == "dense":
        base = dense_linear
    else:
        dims = _wide_dims(config)
        if dims is None:
            base = bsr_linear_factory((m.block, m.block), 1.0 - config.sparsity.final)
        else:  # Sparse Wide: each widened layer keeps its iso-FLOP share of blocks
            layer_sparsity = sparse_ift.wide_layer_sparsity(
                dims[0].d_model, dims[0].d_ff, dims[1].d_model, dims[1].d_ff)

            def base(d_in: int, d_out: int, **kwargs: Any):
                density = 1.0 - layer_sparsity(d_in, d_out)
                return bsr_linear_factory((m.block, m.block), density)(d_in, d_out, **kwargs)
    if m.sparse_ift.family in ("", "wide"):  # Wide: the model is widened, linears unchanged
        return base
    if base is dense_linear:  # GPT gives its dtypes to dense_linear only
        base = functools.partial(dense_linear, dtype=m.dtype, param_dtype="float32")
    return sparse_ift.factory(m.sparse_ift.family, m.sparse_ift.sparsity, base=base,
                              rank_multiple=m.block if m.linear == "bsr" else 1, dtype=m.dtype)


def mask_method(config: ml_collections.ConfigDict, schedule: schedules.Schedule | None):
    s = config.sparsity
    if s.method == "dense" or config.model.linear != "dense":  # BSR: sparsity is structural
        return None
    steps = config.train.steps

    def at(fraction: float) -> int:
        return round(fraction * steps)

    hard_from = None if s.hard_from >= 1 else at(s.hard_from)
    if s.method == "static":
        method = methods.static(target_sparsity(config), score=s.score,
                                allocation=allocation(config),
                                power_scale=s.power_scale)
    elif s.method == "gradual":
        method = methods.gradual(schedule, score=s.score, allocation=s.allocation,
                                 power_scale=s.power_scale)
    elif s.method == "nm":
        method = methods.nm(s.n, s.m, score=s.score, update_every=s.update_every)
    elif s.method == "ste":
        method = methods.ste(s.n, s.m, dense_steps=at(s.warmup), hard_from=hard_from)
    elif s.method == "sr_ste":
        method = methods.sr_ste(s.n, s.m, decay=s.decay, dense_steps=at(s.warmup),
                                hard_from=hard_from)
    elif s.method == "mdgf":
        method = methods.mdgf(s.n, s.m, alpha=s.alpha, kind=s.decay_kind,
                              dense_steps=at(s.warmup), hard_from=hard_from)
    elif s.method == "sdgf":  # frames evenly placed from the end of the warm-up to hard_from
        last = hard_from if hard_from is not None else steps
        first = at(s.warmup)
        frames = sorted({first + round(k * (last - first) / s.frames) for k in range(s.frames)})
        method = methods.sdgf(frames, kind=s.pattern, n=s.n, m=s.m, hard_from=hard_from)
    else:  # set / rigl: update every update_every steps until the end of the window
        dst = methods.set_ if s.method == "set" else methods.rigl
        method = dst(target_sparsity(config), update_every=s.update_every, end_step=at(s.end),
                     drop_fraction=s.drop_fraction, allocation=allocation(config),
                     power_scale=s.power_scale)
    if s.dense_from < 1:  # SPDF: dense from this fraction of the steps on
        method = methods.spdf(method, round(s.dense_from * config.train.steps))
    return method


def optimizer(config: ml_collections.ConfigDict, schedule, masks: Any = None
              ) -> tuple[Any, optax.Schedule]:
    """AdamW with the config's schedule, under ``sparsify`` for a sparse method, or for
    ``masks`` given (``methods.fixed``: sparse fine-tuning keeps them exactly)."""
    t = config.train
    lr = optax.warmup_cosine_decay_schedule(
        0.0, t.lr, t.warmup_steps, t.steps, end_value=t.lr * t.min_lr_ratio
    )
    inner = optax.chain(
        optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
        optax.adamw(lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay),
    )
    method = methods.fixed(masks) if masks is not None else mask_method(config, schedule)
    tx = inner if method is None else sparsify(inner, method, seed=config.seed)
    return tx, lr


@contextlib.contextmanager
def _naming(keys: str) -> Iterator[None]:
    """Prefix a constructor's ``ValueError`` with the config keys it was built from."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"config {keys}: {e}") from e


class Checked(NamedTuple):
    """The cheap pieces :func:`check` builds (``build`` reuses them)."""

    model_cfg: GPTConfig  # vocab_size still the placeholder; build sets the corpus's
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    sparsity_schedule: schedules.Schedule | None


def check(config: ml_collections.ConfigDict) -> Checked:
    """Validate ``config`` by building everything but the corpus and the model's weights.

    Raises ``ValueError`` naming the config key(s) and the valid range."""
    configlib.validate(config)
    with _naming("model.size"):
        GPTConfig.from_variant(config.model.size)
    with _naming("model.*"):
        cfg = model_config(config, vocab_size=256)
    with _naming("sparsity.*"):
        schedule = sparsity_schedule(config)
    with _naming("train.* / sparsity.*"):
        tx, lr = optimizer(config, schedule)
    return Checked(cfg, tx, lr, schedule)
