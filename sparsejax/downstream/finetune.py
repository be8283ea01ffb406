"""Fine-tuning from a run dir, as a config: ``init_from``, ``finetune.mode``, distillation.

SPDF across runs (Thangarasa et al. 2023, "SPDF: Sparse Pre-training and Dense Fine-tuning
for Large Language Models") is two commands: a sparse pre-training run, then a run whose
config sets ``init_from`` to it (``configs/finetune.py``):

* ``finetune.mode = "sparse"``: the pre-training masks are kept exactly
  (:func:`sparsejax.methods.fixed` under ``sparsify``);
* ``finetune.mode = "dense"``: every weight trains; pruned ones start at exactly 0 (where
  pre-training left them) and the fresh optimizer's moments are zero everywhere.

``finetune.distill = "squarehead"`` adds SquareHead distillation (Kurtic et al. 2023) from the
dense teacher run ``finetune.teacher`` (:mod:`sparsejax.run.distill`). :func:`check` validates
the run dirs a config names without loading weights; :func:`start` loads them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optax
from flax import nnx

from sparsejax import errors
from sparsejax.downstream import loading
from sparsejax.methods.base import MaskMethod
from sparsejax.models.gpt import GPT, GPTConfig
from sparsejax.run import build, distill
from sparsejax.run.spec import RunSpec


class Start(NamedTuple):
    """The model, optimizer and objective a fine-tuning run starts from."""

    model: GPT
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    loss: Any  # loss(model, x, y, loss_aux) or None (cross-entropy)
    loss_aux: Any


def _step(step: int) -> int | None:
    return None if step == -1 else step


def _run_config(key: str, run_dir: str, step: int) -> RunSpec:
    """The spec of the run dir a config key names (:class:`ConfigError` naming the key)."""
    try:
        spec = loading.read_config(run_dir)
        loading.checkpoint_step(run_dir, _step(step))
    except (FileNotFoundError, ValueError) as e:
        raise errors.ConfigError(f"config {key}: {e}") from None
    return spec


def check(config: RunSpec) -> None:
    """The run dirs named by ``init_from`` and ``finetune.teacher`` exist, hold a config and
    the checkpoint step asked for, and ``init_from``'s model is the config's (every
    ``model.*`` key equal). Raises :class:`~sparsejax.errors.ConfigError` naming the key."""
    if config.init_from:
        run = _run_config("init_from", config.init_from, config.init_from_step)
        ours, theirs_model = config.model.to_dict(), run.model.to_dict()
        diff = sorted(k for k in ours if ours[k] != theirs_model.get(k))
        if diff:
            theirs = ", ".join(f"model.{k}={theirs_model.get(k)!r}" for k in diff)
            raise errors.ConfigError(f"config model.{diff[0]}: the init_from run "
                                     f"{config.init_from} was trained with {theirs}; set the "
                                     "same model keys")
        if config.finetune.mode == "dense" and run.model.linear != "dense":
            raise errors.ConfigError(f"config finetune.mode: the init_from run "
                                     f"{config.init_from} has BSR layers (sparse by "
                                     "construction), which cannot train dense; use "
                                     "finetune.mode='sparse'")
    if config.finetune.distill:
        _run_config("finetune.teacher", config.finetune.teacher, config.finetune.teacher_step)


def weights(config: RunSpec) -> distill.SquareHeadWeights:
    """The SquareHead weights and temperature of ``config.finetune`` (checked)."""
    f = config.finetune
    return distill.check_weights(distill.SquareHeadWeights(
        float(f.h_ce), float(f.h_kl), float(f.h_sq), float(f.temperature)))


def start(config: RunSpec, model_cfg: GPTConfig, method: MaskMethod | None = None) -> Start:
    """Load ``init_from`` (and the teacher) and build the optimizer that keeps or frees its
    masks. ``model_cfg`` (with the corpus's vocabulary) must be the loaded model's; ``method``:
    the mask method of a student trained from scratch (distillation without ``init_from``)."""
    masks = None
    if config.init_from:
        loaded = loading.load(config.init_from, step=_step(config.init_from_step),
                              dense=config.finetune.mode == "dense")
        if loaded.model.cfg != model_cfg:
            raise errors.ConfigError(f"config init_from: the run's model is {loaded.model.cfg}, "
                                     f"this config and corpus give {model_cfg} (vocabulary of "
                                     "data.source?)")
        model = loaded.model
        if config.finetune.mode == "sparse":
            if loaded.masks is None and loaded.config.model.linear == "dense":
                raise errors.ConfigError(f"config finetune.mode: the init_from run "
                                         f"{config.init_from} holds no masks (a dense run); use "
                                         "finetune.mode='dense'")
            masks = loaded.masks
    else:  # distillation into a freshly initialised student
        model = GPT(model_cfg, rngs=nnx.Rngs(config.seed),
                    linear=build.linear_factory(config))
    tx, lr = build.optimizer(config, None if masks is not None else method, masks=masks)
    loss = aux = None
    if config.finetune.distill == "squarehead":
        teacher = loading.load(config.finetune.teacher, step=_step(config.finetune.teacher_step),
                               dense=True).model
        distill.check_teacher(model, teacher)
        loss, aux = distill.squarehead_loss(teacher, weights(config))
    return Start(model, tx, lr, loss, aux)

