"""Sweeps: every run a recipe's ``sweep(add)`` lists, one run dir each, plus ``sweep.json``.

big_vision style: a recipe file defines ``get_config(arg)`` and ``sweep(add)``; ``add(**kw)``
records one run as dotted-key overrides (``add(**{"model.size": "XS", "train.steps": 600})``).
Runs go sequentially into ``SWEEP_DIR/<name>``; a completed run is skipped and a partial one
resumes from its checkpoint, so relaunching a sweep after a crash finishes it. The sweep dir
is what ``sparsejax fit`` and ``scaling.logs`` read.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from sparsejax import configlib, runlog


def load_recipe(path: str) -> tuple[Any, str | None]:
    """Import a recipe file given as ``FILE.py[:arg]``; returns ``(module, arg)``."""
    file, _, arg = path.partition(":")
    if not Path(file).is_file():
        raise ValueError(f"config file {file!r} does not exist")
    spec = importlib.util.spec_from_file_location(Path(file).stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{file} defines no get_config(arg)")
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
            ) -> list[tuple[str, dict[str, Any], ml_collections.ConfigDict]]:
    """``(name, overrides, validated config)`` for every run of the recipe's sweep.

    ``extra`` (dotted key -> value, e.g. the command line's ``--config.KEY=VALUE``) applies to
    every run after the run's own overrides. Every config is checked
    (:func:`sparsejax.experiment.check`) before any run starts."""
    from sparsejax import experiment

    module, arg = load_recipe(recipe)
    if not hasattr(module, "sweep"):
        raise ValueError(f"{recipe}: the recipe defines no sweep(add)")
    out = []
    for overrides in expand(module.sweep):
        config = module.get_config(arg)
        for key, value in {**overrides, **(extra or {})}.items():
            configlib.set_key(config, key, value)
        experiment.check(config)
        out.append((run_name(overrides), overrides, config))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep of {recipe} lists duplicate runs: {names}")
    return out


def launch(recipe: str, sweep_dir: str | Path, *, extra: dict[str, Any] | None = None,
           dry_run: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or with ``dry_run`` only list) every run of the sweep; returns their entries."""
    from sparsejax import experiment

    sweep_dir = Path(sweep_dir)
    runs = configs(recipe, extra)
    entries = [{"name": n, "overrides": o} for n, o, _ in runs]
    if dry_run:
        return entries
    sweep_dir.mkdir(parents=True, exist_ok=True)
    runlog.write_json(sweep_dir / "sweep.json", {"recipe": recipe, "runs": entries})
    for i, ((name, _, config), entry) in enumerate(zip(runs, entries, strict=True)):
        run_dir = sweep_dir / name
        summary_path = run_dir / "summary.json"
        if summary_path.exists() and json.loads(summary_path.read_text()).get(
                "status") == "completed":
            entry["status"] = "completed (skipped)"
            continue
        print(f"[{i + 1}/{len(runs)}] {name}", flush=True)
        summary = experiment.run(config, str(run_dir), progress=progress)
        entry["status"] = summary["status"]
        entry["final_val_loss"] = summary.get("final_val_loss")
        runlog.write_json(sweep_dir / "sweep.json", {"recipe": recipe, "runs": entries})
    return entries
