"""The mask methods a config can name (``sparsity.method``), each registered in one place.

A :class:`MethodEntry` holds everything the framework knows about a method: the
``sparsity.*`` keys it reads, its validation (beyond the schema's types and ranges), whether
it trains to ``sparsity.final`` at constant sparsity (and so may train Sparse-IFT layers,
iso-FLOP at every step), whether SPDF may switch it to dense, its target-sparsity schedule
and its builder. The schema's list of methods (:data:`sparsejax.run.configlib.ENUMS`), the
validation (:func:`sparsejax.run.configlib.to_spec`) and the optimizer
(:func:`sparsejax.run.build.mask_method`) all read :data:`REGISTRY`.

Adding a method to the framework = the method itself in :mod:`sparsejax.methods` (the
library), plus one :func:`register` call here. Nothing else changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

from sparsejax import methods, schedules
from sparsejax.errors import ConfigError
from sparsejax.methods.base import MaskMethod
from sparsejax.methods.channels import GPT_PAIRS
from sparsejax.methods.ste_unstructured import SCORES as STE_SCORES
from sparsejax.run.spec import RunSpec

#: bytes per step of placing the sparsity window by compute (measured peak ~19.2 B/step)
WINDOW_SOLVE_BYTES_PER_STEP = 24


class Targets(NamedTuple):
    """What a builder needs beyond the spec, computed once by :mod:`sparsejax.run.build`."""

    sparsity: float  # the total target: sparsity.final, or Sparse Wide's rounded total
    allocation: Any  # sparsity.allocation, or Sparse Wide's per-layer iso-FLOP selection
    schedule: schedules.Schedule | None  # the entry's schedule (None: the method has its own)


class MethodEntry(NamedTuple):
    """One registered mask method (module docstring)."""

    name: str
    keys: tuple[str, ...]  # the sparsity.* keys it reads (documentation and `describe_keys`)
    build: Callable[[RunSpec, Targets], MaskMethod]
    check: Callable[[RunSpec], None] | None = None  # raises ConfigError naming the key
    schedule: Callable[[RunSpec, float], schedules.Schedule] | None = None  # (spec, target)
    trains_final: bool = False  # trains to sparsity.final (which must then be > 0)
    constant: bool = False  # constant sparsity: may train Sparse-IFT layers
    spdf: bool = False  # sparsity.dense_from < 1 may switch it to dense (SPDF)


REGISTRY: dict[str, MethodEntry] = {}


def register(entry: MethodEntry) -> MethodEntry:
    """Add ``entry`` to :data:`REGISTRY` (a name may be registered once)."""
    if entry.name in REGISTRY or entry.name == "dense":
        raise ValueError(f"mask method {entry.name!r} is already registered")
    REGISTRY[entry.name] = entry
    return entry


def names() -> tuple[str, ...]:
    """``"dense"`` (no mask method) and every registered method."""
    return ("dense", *REGISTRY)


def need(cond: bool, key: str, expected: str, value: Any) -> None:
    """``ConfigError("config.KEY must be EXPECTED, got VALUE")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"config.{key} must be {expected}, got {value!r}")


def at(spec: RunSpec, fraction: float) -> int:
    """A fraction of ``train.steps`` as a step."""
    return round(fraction * spec.train.steps)


def _hard_from(spec: RunSpec) -> int | None:
    return None if spec.sparsity.hard_from >= 1 else at(spec, spec.sparsity.hard_from)


# --- static / gradual: a target-sparsity schedule ------------------------------------------

def _static_schedule(spec: RunSpec, target: float) -> schedules.Schedule:
    return schedules.constant(target, update_every=spec.train.steps + 1)  # from step 0


def _gradual_schedule(spec: RunSpec, target: float) -> schedules.Schedule:
    s, steps = spec.sparsity, spec.train.steps
    del target  # gradual reaches sparsity.final
    if s.schedule == "window":
        return schedules.window(steps, s.final, start=s.start, end=s.end, kind=s.kind, by=s.by,
                                update_every=s.update_every)
    if s.schedule == "polynomial":
        return schedules.polynomial(s.final, s.begin_step, s.end_step,
                                    update_every=s.update_every)
    if s.schedule == "geometric":
        return schedules.geometric(s.final, s.begin_step, s.end_step,
                                   update_every=s.update_every)
    return schedules.constant(s.final, update_every=s.update_every)


def _check_gradual(spec: RunSpec) -> None:
    s, steps = spec.sparsity, spec.train.steps
    if s.schedule in ("polynomial", "geometric"):
        need(s.begin_step < s.end_step <= steps, "sparsity.begin_step/end_step",
             "begin_step < end_step <= train.steps", (s.begin_step, s.end_step))
    if s.schedule == "window" and s.by == "compute":
        have = physical_memory()
        need(WINDOW_SOLVE_BYTES_PER_STEP * steps <= have, "train.steps",
             f"<= {have // WINDOW_SOLVE_BYTES_PER_STEP} on this machine (placing the sparsity "
             f"window by compute takes about {WINDOW_SOLVE_BYTES_PER_STEP} bytes per step; "
             f"{have / 2**30:.0f} GiB of memory; sparsity.by='steps' needs none)", steps)


def physical_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


register(MethodEntry(
    "static", ("final", "score", "allocation", "power_scale", "dense_from"),
    lambda spec, t: methods.static(t.sparsity, score=spec.sparsity.score,
                                   allocation=t.allocation,
                                   power_scale=spec.sparsity.power_scale),
    schedule=_static_schedule, trains_final=True, constant=True, spdf=True))
register(MethodEntry(
    "gradual", ("final", "schedule", "start", "end", "by", "kind", "begin_step", "end_step",
                "update_every", "score", "allocation", "power_scale", "dense_from"),
    lambda spec, t: methods.gradual(t.schedule, score=spec.sparsity.score,
                                    allocation=spec.sparsity.allocation,
                                    power_scale=spec.sparsity.power_scale),
    check=_check_gradual, schedule=_gradual_schedule, trains_final=True, spdf=True))

# --- N:M and its straight-through family -----------------------------------------------------

register(MethodEntry(
    "nm", ("n", "m", "score", "update_every"),
    lambda spec, t: methods.nm(spec.sparsity.n, spec.sparsity.m, score=spec.sparsity.score,
                               update_every=spec.sparsity.update_every)))
register(MethodEntry(
    "ste", ("n", "m", "warmup", "hard_from"),
    lambda spec, t: methods.ste(spec.sparsity.n, spec.sparsity.m,
                                dense_steps=at(spec, spec.sparsity.warmup),
                                hard_from=_hard_from(spec))))
register(MethodEntry(
    "sr_ste", ("n", "m", "decay", "warmup", "hard_from"),
    lambda spec, t: methods.sr_ste(spec.sparsity.n, spec.sparsity.m, decay=spec.sparsity.decay,
                                   dense_steps=at(spec, spec.sparsity.warmup),
                                   hard_from=_hard_from(spec))))


def _check_mdgf(spec: RunSpec) -> None:
    need(spec.sparsity.alpha > 0, "sparsity.alpha", "a float > 0 (MDGF's decay rate)",
         spec.sparsity.alpha)


register(MethodEntry(
    "mdgf", ("n", "m", "alpha", "decay_kind", "warmup", "hard_from"),
    lambda spec, t: methods.mdgf(spec.sparsity.n, spec.sparsity.m, alpha=spec.sparsity.alpha,
                                 kind=spec.sparsity.decay_kind,
                                 dense_steps=at(spec, spec.sparsity.warmup),
                                 hard_from=_hard_from(spec)),
    check=_check_mdgf))


def sdgf_frames(spec: RunSpec) -> list[int]:
    """SDGF's frames, evenly placed from the end of the warm-up to ``hard_from``."""
    s = spec.sparsity
    hard_from = _hard_from(spec)
    last = hard_from if hard_from is not None else spec.train.steps
    first = at(spec, s.warmup)
    return sorted({first + round(k * (last - first) / s.frames) for k in range(s.frames)})


register(MethodEntry(
    "sdgf", ("n", "m", "frames", "pattern", "warmup", "hard_from"),
    lambda spec, t: methods.sdgf(sdgf_frames(spec), kind=spec.sparsity.pattern,
                                 n=spec.sparsity.n, m=spec.sparsity.m,
                                 hard_from=_hard_from(spec))))

# --- dynamic sparse training: update every update_every steps until the window's end -------


def _check_dst(spec: RunSpec) -> None:
    need(spec.sparsity.allocation in ("uniform", "erk"), "sparsity.allocation",
         f"'uniform' or 'erk' for {spec.sparsity.method}", spec.sparsity.allocation)


def _dst(fn: Callable[..., MaskMethod]) -> Callable[[RunSpec, Targets], MaskMethod]:
    def build(spec: RunSpec, t: Targets) -> MaskMethod:
        s = spec.sparsity
        return fn(t.sparsity, update_every=s.update_every, end_step=at(spec, s.end),
                  drop_fraction=s.drop_fraction, allocation=t.allocation,
                  power_scale=s.power_scale)

    return build


_DST_KEYS = ("final", "update_every", "end", "drop_fraction", "allocation", "power_scale")
register(MethodEntry("set", _DST_KEYS, _dst(methods.set_), check=_check_dst, trains_final=True,
                     constant=True))
register(MethodEntry("rigl", _DST_KEYS, _dst(methods.rigl), check=_check_dst,
                     trains_final=True, constant=True))

# --- methods v2 (issue 27): unstructured STE, channels, AC/DC, block ------------------------


def _check_ste_unstructured(spec: RunSpec) -> None:
    need(spec.sparsity.score in STE_SCORES, "sparsity.score",
         f"one of {STE_SCORES} for ste_unstructured", spec.sparsity.score)


register(MethodEntry(
    "ste_unstructured", ("final", "score", "allocation", "power_scale", "warmup", "hard_from"),
    lambda spec, t: methods.ste_unstructured(
        t.sparsity, score=spec.sparsity.score, allocation=t.allocation,
        power_scale=spec.sparsity.power_scale, dense_steps=at(spec, spec.sparsity.warmup),
        hard_from=_hard_from(spec)),
    check=_check_ste_unstructured, trains_final=True))


def _check_structured(spec: RunSpec) -> None:
    need(spec.sparsity.allocation in ("uniform", "global"), "sparsity.allocation",
         f"'uniform' or 'global' for {spec.sparsity.method}", spec.sparsity.allocation)
    _check_gradual(spec)


_GRADUAL_KEYS = ("final", "schedule", "start", "end", "by", "kind", "begin_step", "end_step",
                 "update_every", "score", "allocation")
register(MethodEntry(
    "channels", _GRADUAL_KEYS,
    lambda spec, t: methods.channels(t.sparsity, score=spec.sparsity.score, schedule=t.schedule,
                                     pairs=GPT_PAIRS, allocation=spec.sparsity.allocation),
    check=_check_structured, schedule=_gradual_schedule, trains_final=True))


def _check_block(spec: RunSpec) -> None:
    _check_structured(spec)
    from sparsejax.models.gpt import GPTConfig  # flax: only for this method's check

    try:
        cfg = GPTConfig.from_variant(spec.model.size)
    except ValueError:
        return  # the blueprint reports model.size itself, naming the key
    b = spec.model.block
    need(cfg.d_model % b == 0 and cfg.d_ff % b == 0, "model.block",
         f"a divisor of d_model ({cfg.d_model}) and d_ff ({cfg.d_ff}) for sparsity.method="
         "'block' (its square blocks tile every kernel)", b)


register(MethodEntry(
    "block", (*_GRADUAL_KEYS, "pooling"),  # the block: model.block (square)
    lambda spec, t: methods.block(t.sparsity, block=(spec.model.block, spec.model.block),
                                  score=spec.sparsity.score, schedule=t.schedule,
                                  pooling=spec.sparsity.pooling,
                                  allocation=spec.sparsity.allocation),
    check=_check_block, schedule=_gradual_schedule, trains_final=True))


def acdc_finetune_from(spec: RunSpec) -> int:
    """The first step of AC/DC's final sparse phase: ``train.steps - finetune_steps``."""
    return spec.train.steps - spec.sparsity.acdc.finetune_steps


def _check_acdc(spec: RunSpec) -> None:
    a = spec.sparsity.acdc
    for key in ("warmup_steps", "dense_steps", "sparse_steps", "finetune_steps"):
        need(getattr(a, key) >= 1, f"sparsity.acdc.{key}", "an int >= 1", getattr(a, key))
    need(a.warmup_steps + a.finetune_steps <= spec.train.steps, "sparsity.acdc.finetune_steps",
         f"<= train.steps - sparsity.acdc.warmup_steps = {spec.train.steps - a.warmup_steps} "
         "(the final sparse phase follows the dense warm-up)", a.finetune_steps)


register(MethodEntry(
    "acdc", ("final", "acdc", "score", "allocation", "power_scale"),
    lambda spec, t: methods.acdc(
        t.sparsity, dense_steps=spec.sparsity.acdc.dense_steps,
        sparse_steps=spec.sparsity.acdc.sparse_steps,
        warmup_steps=spec.sparsity.acdc.warmup_steps, finetune_from=acdc_finetune_from(spec),
        score=spec.sparsity.score, allocation=t.allocation,
        power_scale=spec.sparsity.power_scale),
    check=_check_acdc, trains_final=True))
