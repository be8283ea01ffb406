"""Planning a sweep: the runs a recipe's ``sweep(add)`` lists, their resolved configs, and
what a launch does with each (run, resume, skip), checked before anything runs."""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from sparsejax import errors
from sparsejax.run import accounting, build, configlib, experiment
from sparsejax.run.rundir import SweepDir
from sparsejax.run.spec import RunSpec

FINISHED = ("completed", "diverged")  # rerunning gives the same result: skipped on relaunch


def load_recipe(path: str) -> tuple[Any, str | None]:
    """Import a recipe file given as ``FILE.py[:arg]``; returns ``(module, arg)``."""
    file, _, arg = path.partition(":")
    if not Path(file).is_file():
        raise errors.MissingInputError(f"config file {file!r} does not exist")
    spec = importlib.util.spec_from_file_location(Path(file).stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise errors.InputError(f"{file} defines no get_config(arg)")
    return module, (arg or None)


def expand(sweep_fn: Callable[[Callable[..., None]], None]) -> list[dict[str, Any]]:
    """The list of override dicts a ``sweep(add)`` function produces."""
    runs: list[dict[str, Any]] = []
    sweep_fn(lambda **kw: runs.append(dict(kw)))
    return runs


def run_name(overrides: dict[str, Any]) -> str:
    """A readable, filesystem-safe run name: ``size=XS,final=0.5`` -> ``size-XS_final-0.5``."""
    parts = [f"{k.split('.')[-1]}-{v}" for k, v in sorted(overrides.items())]
    return re.sub(r"[^A-Za-z0-9_.-]", "", "_".join(parts)) or "run"


def configs(recipe: str, extra: dict[str, Any] | None = None
            ) -> list[tuple[str, dict[str, Any], RunSpec]]:
    """``(name, overrides, spec)`` for every run of the recipe's sweep: the recipe's config
    with the overrides, read once into its :class:`~sparsejax.run.spec.RunSpec`.

    ``extra`` (dotted key -> value, e.g. the command line's ``--config.KEY=VALUE``) applies to
    every run after the run's own overrides. Every config is checked
    (:func:`sparsejax.run.experiment.check`) before any run starts."""
    module, arg = load_recipe(recipe)
    if not hasattr(module, "sweep"):
        raise errors.InputError(f"{recipe}: the recipe defines no sweep(add)")
    out = []
    for overrides in expand(module.sweep):
        config = module.get_config(arg)
        for key, value in {**overrides, **(extra or {})}.items():
            configlib.set_key(config, key, value)
        spec = configlib.validate(config)
        experiment.check(spec)
        out.append((run_name(overrides), overrides, spec))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise errors.InputError(f"sweep of {recipe} lists duplicate runs: {names}")
    return out


class Run(NamedTuple):
    """One planned run of a sweep."""

    name: str
    overrides: dict[str, Any]  # the run's own overrides, then the command line's
    spec: RunSpec  # resolved (wandb.group set to the sweep's)
    action: str  # "run" (new), "resume" (from its latest checkpoint) or "skip" (finished)
    done_steps: int  # steps already trained (the latest checkpoint; steps when skipped)
    cost: float  # expected cost in step-equivalents (the progress bar's weight, _cost)


def _cost(spec: RunSpec) -> float:
    """A run's expected cost in step-equivalents, the progress bar's weight: ``steps · (1 +
    f / 3e5) + 150`` with ``f`` the model's forward FLOPs per token. At CPU scale a step costs
    a fixed overhead plus its FLOPs, and each run a start-up and a final evaluation worth about
    150 steps; fitted to one-core runs of the nano / tiny / mini models (about 300k FLOPs per
    token for tiny)."""
    m = build.model_config(spec, vocab_size=256)
    f = accounting.flops_per_token(m.n_layer, m.d_model, m.d_ff, spec.train.seq_len, 256)
    return spec.train.steps * (1.0 + f / 3e5) + 150.0


def _config_change(old: dict[str, Any], new: dict[str, Any], keys: list[str]) -> str:
    def get(d: dict[str, Any], dotted: str) -> Any:
        for part in dotted.split("."):
            if not isinstance(d, dict) or part not in d:
                return "<absent>"
            d = d[part]
        return d

    return ", ".join(f"{k}: {get(old, k)!r} -> {get(new, k)!r}" for k in keys)


def plan(recipe: str, sweep_dir: str | Path, *, extra: dict[str, Any] | None = None,
         only: str | None = None) -> list[Run]:
    """The runs of ``recipe`` (those whose name matches a glob of ``only``, comma-separated)
    and what a launch does with each. Raises :class:`~sparsejax.errors.InputError` naming a
    run dir file that cannot be read or has the wrong type, or a run dir that is read-only
    (:meth:`RunDir.check_files <sparsejax.run.rundir.RunDir.check_files>`), every
    run whose stored config differs from its resolved config (and the keys), and
    :class:`~sparsejax.errors.RunDirBusyError` naming every run another process trains right
    now."""
    sweep = SweepDir(sweep_dir)
    sweep_dir = sweep.path
    runs = configs(recipe, extra)
    if only is not None:  # comma-separated globs (run names hold no commas)
        globs = [g for g in only.split(",") if g]
        picked = [r for r in runs if any(fnmatch.fnmatchcase(r[0], g) for g in globs)]
        if not picked:
            raise errors.InputError(f"--only {only!r} matches no run of {recipe} (runs: "
                                    f"{', '.join(n for n, _, _ in runs)})")
        runs = picked
    out, changed, busy = [], [], []
    for name, overrides, spec in runs:
        if not spec.wandb.group:  # wandb runs of a sweep share a group
            spec = spec.replace(wandb=dataclasses.replace(spec.wandb,
                                                          group=sweep_dir.resolve().name))
        run = sweep.run(name)
        if run.path.is_dir():  # its files read, and it writable, before anything runs
            run.check_usable()
            run.check_files()
        old = run.read_config()
        new = json.loads(json.dumps(spec.to_dict()))
        if old is not None:
            keys = configlib.differing_keys(old, new)
            if keys:
                changed.append(f"{name} ({_config_change(old, new, keys)})")
                continue
        owner = run.lock_owner()
        if owner is not None:
            busy.append(f"{name} (process {owner})")
        summary = run.read_summary() or {}
        steps = spec.train.steps
        if summary.get("status") in FINISHED and summary.get("steps") == steps:
            action, done = "skip", steps
        else:
            done = run.latest_checkpoint_step() or 0
            action = "resume" if done else "run"
        out.append(Run(name, {**overrides, **(extra or {})}, spec, action, done, _cost(spec)))
    if changed:
        raise errors.InputError(
            f"sweep dir {sweep_dir}: the config of {len(changed)} run(s) differs from the one "
            f"they were trained with: {'; '.join(changed)}. Relaunch with the same recipe and "
            "overrides, use a new --workdir, or delete those run dirs")
    if busy:
        raise errors.RunDirBusyError(f"sweep dir {sweep_dir}: run(s) in use by another process: "
                                     f"{', '.join(busy)}; wait for them or stop them")
    return out
