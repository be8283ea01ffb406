"""``run(config, workdir)``: the entry from a config to a trained run dir.

The one path: the ConfigDict is read once (:func:`sparsejax.run.configlib.validate` ->
:class:`~sparsejax.run.spec.RunSpec`), :func:`check` builds the cheap pieces
(:func:`sparsejax.run.build.blueprint`) and checks the run dirs a fine-tuning config names,
:func:`build` loads the corpus and builds the model (or loads it:
:mod:`sparsejax.downstream.finetune`), and :func:`run` joins the device mesh and hands spec and
experiment to :func:`sparsejax.run.train.run`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import ml_collections
from flax import nnx

from sparsejax.downstream import finetune
from sparsejax.models.gpt import GPT
from sparsejax.run import build as build_lib
from sparsejax.run import configlib, data, distributed, memory, train
from sparsejax.run.build import Experiment
from sparsejax.run.spec import RunSpec

Config = ml_collections.ConfigDict | RunSpec


def spec_of(config: Config) -> RunSpec:
    """``config`` as a validated :class:`RunSpec` (a spec passes through)."""
    return config if isinstance(config, RunSpec) else configlib.validate(config)


def check(config: Config) -> build_lib.Blueprint:
    """Everything a config can be checked for before its data and weights are loaded: the
    schema and ranges, the pieces :func:`sparsejax.run.build.blueprint` builds, and the run
    dirs ``init_from`` and ``finetune.teacher`` name (:func:`sparsejax.downstream.finetune.
    check`). Raises :class:`~sparsejax.errors.ConfigError` naming the key."""
    spec = spec_of(config)
    blueprint = build_lib.blueprint(spec)
    if spec.init_from or spec.finetune.distill:
        finetune.check(spec)
    return blueprint


def build(config: Config) -> Experiment:
    """Check ``config`` (:func:`check`), load the corpus and build the model and optimizer
    (from ``init_from`` for fine-tuning)."""
    spec = spec_of(config)
    blueprint = check(spec)
    build_lib.check_device(blueprint.model_cfg)  # before the corpus loads
    corpus = data.load_spec(spec.data)
    cfg = dataclasses.replace(blueprint.model_cfg, vocab_size=corpus.vocab_size)
    if spec.init_from or spec.finetune.distill:
        start = finetune.start(spec, cfg, blueprint.method)
        return Experiment(start.model, start.tx, corpus, start.lr_schedule,
                          blueprint.sparsity_schedule, start.loss, start.loss_aux)
    model = GPT(cfg, rngs=nnx.Rngs(spec.seed),
                linear=build_lib.linear_factory(spec, blueprint.wide))
    return Experiment(model, blueprint.tx, corpus, blueprint.lr_schedule,
                      blueprint.sparsity_schedule)


def run(config: Config, workdir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Build ``config`` and train it in ``workdir`` (resuming from its checkpoints), on the
    ``mesh.*`` device mesh (joining a multi-process job first when ``mesh.*`` or the
    environment asks for one: :func:`sparsejax.run.distributed.initialize`). A run whose token
    batches cannot fit the host's memory (:func:`sparsejax.run.memory.check_host_batches`), or
    whose train step cannot fit its devices' memory (:func:`sparsejax.run.memory.check_fits`),
    is refused first (:class:`~sparsejax.errors.ConfigError`)."""
    spec = spec_of(config)
    m = spec.mesh
    distributed.initialize(distributed.Distributed(m.coordinator, m.num_processes, m.process_id))
    memory.check_host_batches(spec)  # refuses, before any allocation, batches the host cannot hold
    memory.check_fits(spec)  # refuses, before data and weights, a step the device cannot hold
    exp = build(spec)
    mesh = distributed.make_mesh(distributed.MeshShape(m.data, m.fsdp))
    return train.run(spec, exp, workdir, mesh=mesh, progress=progress)
