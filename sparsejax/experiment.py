"""``build(config)``: turn a ConfigDict into the explicit pieces ``train.run`` takes.

This is one of the two places that read a ConfigDict (the other is the CLI), and the one place
that validates it: :func:`check` checks the schema and ranges (``configlib.validate``) and then
builds the objects whose constructors check the rest (model variant, schedules, optimizer),
so a bad value fails before any data is loaded, with ``ValueError`` naming the config key.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, NamedTuple

import ml_collections
import optax
from flax import nnx

from sparsejax import configlib, data, distributed, methods, schedules
from sparsejax.models.gpt import GPT, GPTConfig
from sparsejax.models.layers import dense_linear
from sparsejax.transforms import sparsify


class Experiment(NamedTuple):
    """Everything a run needs, built from a config."""

    model: GPT
    model_cfg: GPTConfig
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    sparsity_schedule: schedules.Schedule | None  # target sparsity per step (None: dense)
    corpus: data.Corpus
    config: ml_collections.ConfigDict


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> GPTConfig:
    """The model's :class:`GPTConfig` (``model.size`` decoded by ``GPTConfig.from_variant``)."""
    m = config.model
    return GPTConfig.from_variant(
        m.size, n_ctx=m.n_ctx, pos=m.pos, tie_embeddings=m.tie_embeddings, dtype=m.dtype,
        vocab_size=vocab_size,
    )


def sparsity_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule | None:
    """The target-sparsity schedule of a static or gradual config (``None`` otherwise: dense
    runs, and methods whose target comes from their own definition, e.g. N:M)."""
    s, steps = config.sparsity, config.train.steps
    if s.method not in ("static", "gradual"):  # dense, or a method with its own targets
        return None
    if s.method == "static":
        return schedules.constant(s.final, update_every=steps + 1)  # held from step 0
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
    """The model's linear-layer factory: dense, or BSR kernels with a static block mask."""
    if config.model.linear == "dense":
        return dense_linear
    from pallas_kernels.layers import bsr_linear_factory

    block = (config.model.block, config.model.block)
    return bsr_linear_factory(block, 1.0 - config.sparsity.final)


def mask_method(config: ml_collections.ConfigDict, schedule: schedules.Schedule | None):
    s = config.sparsity
    if s.method == "dense" or config.model.linear != "dense":  # BSR: sparsity is structural
        return None
    steps = config.train.steps

    def at(fraction: float) -> int:
        return round(fraction * steps)

    hard_from = None if s.hard_from >= 1 else at(s.hard_from)
    if s.method == "static":
        method = methods.static(s.final, score=s.score, allocation=s.allocation,
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
        method = dst(s.final, update_every=s.update_every, end_step=at(s.end),
                     drop_fraction=s.drop_fraction, allocation=s.allocation,
                     power_scale=s.power_scale)
    if s.dense_from < 1:  # SPDF: dense from this fraction of the steps on
        method = methods.spdf(method, round(s.dense_from * config.train.steps))
    return method


def optimizer(config: ml_collections.ConfigDict, schedule) -> tuple[Any, optax.Schedule]:
    t = config.train
    lr = optax.warmup_cosine_decay_schedule(
        0.0, t.lr, t.warmup_steps, t.steps, end_value=t.lr * t.min_lr_ratio
    )
    inner = optax.chain(
        optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
        optax.adamw(lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay),
    )
    method = mask_method(config, schedule)
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


def build(config: ml_collections.ConfigDict) -> Experiment:
    """Validate ``config`` (:func:`check`) and build model, optimizer, schedules and corpus."""
    checked = check(config)
    corpus = data.load_corpus(
        config.data.source or None, cache_dir=config.data.cache_dir or None,
        val_fraction=config.data.val_fraction,
    )
    cfg = dataclasses.replace(checked.model_cfg, vocab_size=corpus.vocab_size)
    model = GPT(cfg, rngs=nnx.Rngs(config.seed), linear=linear_factory(config))
    return Experiment(model, cfg, checked.tx, checked.lr_schedule, checked.sparsity_schedule,
                      corpus, config)


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True
        ) -> dict[str, Any]:
    """Build ``config`` and train it in ``workdir`` (resuming from its checkpoints), on the
    ``mesh.*`` device mesh (joining a multi-process job first when ``mesh.*`` or the
    environment asks for one: :func:`sparsejax.distributed.initialize`)."""
    configlib.validate(config)
    m = config.mesh
    distributed.initialize(distributed.Distributed(m.coordinator, m.num_processes, m.process_id))
    exp = build(config)
    mesh = distributed.make_mesh(distributed.MeshShape(m.data, m.fsdp))
    from sparsejax import train  # after build: a bad config fails before the heavy imports

    t, ev = config.train, config.eval
    return train.run(
        exp.model, exp.tx, exp.corpus, workdir, steps=t.steps, batch_size=t.batch_size,
        seq_len=t.seq_len, seed=config.seed, lr_schedule=exp.lr_schedule,
        eval_every=ev.every,
        eval_batches=ev.batches, eval_batch_size=ev.batch_size, log_every=t.log_every,
        checkpoint_every=config.checkpoint.every, keep_checkpoints=config.checkpoint.keep,
        config=config.to_dict(), wandb=config.wandb.to_dict(), progress=progress, mesh=mesh,
    )
