"""``run(config, workdir)``: the entry from a ConfigDict to a trained run dir.

:func:`build` validates the config (:func:`sparsejax.run.build.check`), loads the corpus and
builds the model (or loads it, for fine-tuning: :mod:`sparsejax.downstream.finetune`);
:func:`run` joins the device mesh and hands everything to :func:`sparsejax.run.train.run`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import ml_collections
import optax
from flax import nnx

from sparsejax import schedules
from sparsejax.downstream import finetune
from sparsejax.models.gpt import GPT, GPTConfig
from sparsejax.run import build as build_lib
from sparsejax.run import configlib, data, distributed, train


class Experiment(NamedTuple):
    """Everything a run needs, built from a config."""

    model: GPT
    model_cfg: GPTConfig
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    sparsity_schedule: schedules.Schedule | None  # target sparsity per step (None: dense)
    corpus: data.Corpus
    config: ml_collections.ConfigDict
    loss: Any = None  # training objective loss(model, x, y, loss_aux); None: cross-entropy
    loss_aux: Any = None  # e.g. the SquareHead teacher's state


def check(config: ml_collections.ConfigDict) -> build_lib.Checked:
    """:func:`sparsejax.run.build.check`, and the run dirs ``init_from`` and
    ``finetune.teacher`` name (:func:`sparsejax.downstream.finetune.check`): everything a
    config can be checked for before its data and weights are loaded."""
    checked = build_lib.check(config)
    if config.init_from or config.finetune.distill:
        finetune.check(config)
    return checked


def build(config: ml_collections.ConfigDict) -> Experiment:
    """Validate ``config`` (:func:`check`) and build model, optimizer, schedules and corpus."""
    checked = check(config)
    corpus = data.load_corpus(
        config.data.source or None, cache_dir=config.data.cache_dir or None,
        val_fraction=config.data.val_fraction,
    )
    cfg = dataclasses.replace(checked.model_cfg, vocab_size=corpus.vocab_size)
    if config.init_from or config.finetune.distill:
        start = finetune.start(config, cfg, checked.sparsity_schedule)
        return Experiment(start.model, cfg, start.tx, start.lr_schedule,
                          checked.sparsity_schedule, corpus, config, start.loss, start.loss_aux)
    model = GPT(cfg, rngs=nnx.Rngs(config.seed), linear=build_lib.linear_factory(config))
    return Experiment(model, cfg, checked.tx, checked.lr_schedule, checked.sparsity_schedule,
                      corpus, config)


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True
        ) -> dict[str, Any]:
    """Build ``config`` and train it in ``workdir`` (resuming from its checkpoints), on the
    ``mesh.*`` device mesh (joining a multi-process job first when ``mesh.*`` or the
    environment asks for one: :func:`sparsejax.run.distributed.initialize`)."""
    configlib.validate(config)
    m = config.mesh
    distributed.initialize(distributed.Distributed(m.coordinator, m.num_processes, m.process_id))
    exp = build(config)
    mesh = distributed.make_mesh(distributed.MeshShape(m.data, m.fsdp))
    t, ev = config.train, config.eval
    return train.run(
        exp.model, exp.tx, exp.corpus, workdir, steps=t.steps, batch_size=t.batch_size,
        seq_len=t.seq_len, seed=config.seed, lr_schedule=exp.lr_schedule,
        eval_every=ev.every,
        eval_batches=ev.batches, eval_batch_size=ev.batch_size,
        final_eval_batches=ev.final_batches, eval_seed=ev.seed, log_every=t.log_every,
        checkpoint_every=config.checkpoint.every, keep_checkpoints=config.checkpoint.keep,
        config=config.to_dict(), wandb=config.wandb.to_dict(), progress=progress,
        loss=exp.loss, loss_aux=exp.loss_aux, mesh=mesh,
    )
