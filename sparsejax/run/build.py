"""Run spec -> the objects a run is made of: model config, Sparse Wide plan, target-sparsity
schedule, mask method, optimizer, linear factory. Pure construction (no I/O, no data, no
weights): :func:`blueprint` builds them all, so a bad value fails before anything is loaded,
with :class:`~sparsejax.errors.ConfigError` naming the config keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, NamedTuple

import optax

from pallas_kernels.block_sparse.format import check_block
from pallas_kernels.layers import bsr_linear_factory, nm_linear_factory
from pallas_kernels.nm.format import check_nm, code_layout
from sparsejax import methods, schedules
from sparsejax.errors import ConfigError
from sparsejax.methods.base import MaskMethod
from sparsejax.models import sparse_ift
from sparsejax.models.attention import resolve_attention
from sparsejax.models.gpt import GPT, GPTConfig
from sparsejax.models.layers import LinearFactory, dense_linear
from sparsejax.run import mask_methods
from sparsejax.run.data import Corpus
from sparsejax.run.spec import RunSpec
from sparsejax.transforms import sparsify

PLACEHOLDER_VOCAB = 256  # until the corpus is loaded: no shape that a check reads depends on it


def base_model_config(spec: RunSpec, vocab_size: int = PLACEHOLDER_VOCAB) -> GPTConfig:
    """The dense model's :class:`GPTConfig` (``model.size`` decoded by
    ``GPTConfig.from_variant``), before any Sparse Wide widening."""
    m = spec.model
    return GPTConfig.from_variant(m.size, n_ctx=m.n_ctx, pos=m.pos,
                                  tie_embeddings=m.tie_embeddings, dtype=m.dtype,
                                  vocab_size=vocab_size, attention=m.attention, remat=m.remat,
                                  scan=m.scan)


def wide_plan(spec: RunSpec) -> sparse_ift.WidePlan | None:
    """Sparse Wide's widths and per-layer sparsities (:func:`sparsejax.models.sparse_ift.
    plan_wide`), computed once; ``None`` unless ``model.sparse_ift.family == "wide"``."""
    m = spec.model
    if m.sparse_ift.family != "wide":
        return None
    return sparse_ift.plan_wide(base_model_config(spec), m.sparse_ift.sparsity,
                                block=m.block if m.linear == "bsr" else None)


def model_config(spec: RunSpec, vocab_size: int, wide: sparse_ift.WidePlan | None = None
                 ) -> GPTConfig:
    """The model's :class:`GPTConfig` with ``vocab_size``: widened under Sparse Wide (``wide``
    defaults to :func:`wide_plan`)."""
    cfg = base_model_config(spec, vocab_size)
    wide = wide if wide is not None else wide_plan(spec)
    if wide is None:
        return cfg
    return dataclasses.replace(cfg, d_model=wide.wide.d_model, d_ff=wide.wide.d_ff)


def targets(spec: RunSpec, wide: sparse_ift.WidePlan | None) -> mask_methods.Targets:
    """The mask method's total target and allocation: ``sparsity.final`` and
    ``sparsity.allocation``, except under Sparse Wide (at a sparsity > 0), whose widths are
    rounded up: there the total is the plan's (slightly above ``s``) and each layer gets its own
    iso-FLOP share (:func:`sparsejax.models.sparse_ift.wide_selection`); with the method's
    target-sparsity schedule (``None`` for methods with their own targets)."""
    s = spec.sparsity
    sparsity, allocation = s.final, s.allocation
    if wide is not None and s.final > 0:
        sparsity = wide.sparsity
        allocation = sparse_ift.wide_selection(wide.layer_sparsity)
    entry = mask_methods.REGISTRY.get(s.method)
    schedule = (entry.schedule(spec, sparsity)
                if entry is not None and entry.schedule is not None else None)
    return mask_methods.Targets(sparsity, allocation, schedule)


def linear_factory(spec: RunSpec, wide: sparse_ift.WidePlan | None = None) -> LinearFactory:
    """The model's linear-layer factory: dense, N:M kernels with a static
    ``sparsity.n:sparsity.m`` mask (the largest initial weights of every group), or BSR kernels
    with a static block mask (under Sparse Wide each widened layer keeps its iso-FLOP share of
    blocks); a Sparse-IFT family (``model.sparse_ift``) builds its layers from that one. The
    model hands every layer its compute dtype (``model.dtype``)."""
    m = spec.model
    wide = wide if wide is not None else wide_plan(spec)
    if m.linear == "dense":
        base: LinearFactory = dense_linear
    elif m.linear == "nm":  # validation: no Sparse-IFT (a constant method) with N:M layers
        base = nm_linear_factory(spec.sparsity.n, spec.sparsity.m)
    elif wide is None or spec.sparsity.final == 0:
        base = bsr_linear_factory((m.block, m.block), 1.0 - spec.sparsity.final)
    else:
        def base(d_in: int, d_out: int, **kwargs: Any):
            density = 1.0 - wide.layer_sparsity(d_in, d_out)
            return bsr_linear_factory((m.block, m.block), density)(d_in, d_out, **kwargs)
    if m.sparse_ift.family in ("", "wide"):  # Wide: the model is widened, linears unchanged
        return base
    return sparse_ift.factory(m.sparse_ift.family, m.sparse_ift.sparsity, base=base,
                              rank_multiple=m.block if m.linear == "bsr" else 1)


def check_kernel_shapes(spec: RunSpec, cfg: GPTConfig) -> None:
    """``ValueError`` unless the kernel layers of ``model.linear`` take the model's linears:
    BSR blocks must tile ``(d_model, d_ff)`` matrices, and N:M groups of ``sparsity.m`` must
    divide every contraction dim (``d_model``, ``d_ff``) with the in-group positions of a group
    fitting 32 bits. Sparse-IFT builds other widths; its layers check themselves."""
    m, s = spec.model, spec.sparsity
    if m.linear == "dense" or m.sparse_ift.family not in ("", "wide"):
        return
    for d_in, d_out in ((cfg.d_model, cfg.d_model), (cfg.d_model, cfg.d_ff),
                        (cfg.d_ff, cfg.d_model)):
        if m.linear == "bsr":
            check_block((d_in, d_out), (m.block, m.block))
        else:
            check_nm((d_in, d_out), s.n, s.m)
            code_layout(d_in // s.m, s.n, s.m)


def mask_method(spec: RunSpec, targets_: mask_methods.Targets) -> MaskMethod | None:
    """The registered method ``sparsity.method`` (:mod:`sparsejax.run.mask_methods`), under
    SPDF when ``sparsity.dense_from < 1``; ``None`` for dense runs and kernel layers (sparse by
    construction)."""
    s = spec.sparsity
    if s.method == "dense" or spec.model.linear != "dense":
        return None
    method = mask_methods.REGISTRY[s.method].build(spec, targets_)
    if s.dense_from < 1:  # SPDF: dense from this fraction of the steps on
        method = methods.spdf(method, mask_methods.at(spec, s.dense_from))
    return method


def lr_schedule(spec: RunSpec) -> optax.Schedule:
    """Linear warm-up to ``train.lr``, then cosine decay to ``lr * min_lr_ratio``."""
    t = spec.train
    return optax.warmup_cosine_decay_schedule(0.0, t.lr, t.warmup_steps, t.steps,
                                              end_value=t.lr * t.min_lr_ratio)


def optimizer(spec: RunSpec, method: MaskMethod | None = None, *, masks: Any = None
              ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (with gradient clipping) on :func:`lr_schedule`, under ``sparsify`` with
    ``method``, or with ``methods.fixed(masks)`` for ``masks`` given (sparse fine-tuning keeps
    them exactly)."""
    t = spec.train
    lr = lr_schedule(spec)
    inner = optax.chain(
        optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
        optax.adamw(lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay),
    )
    if masks is not None:
        method = methods.fixed(masks)
    tx = inner if method is None else sparsify(
        inner, method, seed=spec.seed, packed_masks=spec.sparsity.packed_masks)
    return tx, lr


@contextlib.contextmanager
def _naming(keys: str) -> Iterator[None]:
    """A constructor's ``ValueError`` as a :class:`ConfigError` naming the config keys."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"config {keys}: {e}") from e


def check_device(cfg: GPTConfig) -> None:
    """What the model asks of this process's device: ``model.attention='cudnn'`` needs cuDNN
    flash attention to run here (an NVIDIA GPU); :class:`ConfigError` naming the key otherwise.
    Called where the model is built (:func:`sparsejax.run.experiment.build`), not by
    :func:`blueprint`, which also checks configs planned on another machine (sweeps)."""
    if cfg.attention == "cudnn":
        with _naming("model.attention"):
            resolve_attention("cudnn", dtype=cfg.dtype, head_dim=cfg.head_dim)


class Blueprint(NamedTuple):
    """The cheap pieces of a run, built from its spec alone (:func:`blueprint`)."""

    model_cfg: GPTConfig  # vocab_size still the placeholder; experiment sets the corpus's
    wide: sparse_ift.WidePlan | None  # Sparse Wide's plan
    sparsity_schedule: schedules.Schedule | None  # target sparsity per step (None: dense)
    method: MaskMethod | None
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule


def blueprint(spec: RunSpec) -> Blueprint:
    """Build everything but the corpus and the model's weights; raises
    :class:`~sparsejax.errors.ConfigError` naming the config keys."""
    with _naming("model.size"):
        GPTConfig.from_variant(spec.model.size)
    with _naming("model.*"):
        wide = wide_plan(spec)
        cfg = model_config(spec, PLACEHOLDER_VOCAB, wide)
    with _naming("model.linear / model.block / sparsity.n / sparsity.m"):
        check_kernel_shapes(spec, cfg)
    with _naming("sparsity.*"):
        t = targets(spec, wide)
        method = mask_method(spec, t)
    with _naming("train.* / sparsity.*"):
        tx, lr = optimizer(spec, method)
    return Blueprint(cfg, wide, t.schedule, method, tx, lr)


class Experiment(NamedTuple):
    """What :func:`sparsejax.run.train.run` trains: built from a spec by
    :func:`sparsejax.run.experiment.build`, or by hand (tests, notebooks)."""

    model: GPT
    tx: optax.GradientTransformation
    corpus: Corpus
    lr_schedule: optax.Schedule | None = None  # logged as ``lr``
    sparsity_schedule: schedules.Schedule | None = None  # target sparsity per step
    loss: Any = None  # training objective loss(model, x, y, loss_aux); None: cross-entropy
    loss_aux: Any = None  # e.g. the SquareHead teacher's state
