"""Configs: recipes validate; bad keys and values fail in one place (experiment.check), naming
the key and the valid range."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from sparsejax import errors
from sparsejax.run import configlib, experiment, mask_methods

ROOT = Path(__file__).resolve().parents[1]


def load_recipe(name: str, arg: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


@pytest.mark.parametrize(
    "arg, match",
    [
        ("bogus=1", "unknown config key"),
        ("train.stepz=3", "unknown config key"),
        ("steps=abc", "train.steps"),
    ],
)
def test_config_arg_errors(arg, match):
    with pytest.raises(ValueError, match=match):
        load_recipe("base", arg)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("train.steps", 0, "train.steps"),
        ("sparsity.final", 1.0, "sparsity.final"),
        ("sparsity.allocation", "nope", "sparsity.allocation"),
        ("train.seq_len", 4096, "train.seq_len"),
        ("train.lr", -1.0, "train.lr"),
        ("sparsity.start", 0.9, "sparsity.start"),
    ],
)
def test_config_value_errors(key, value, match):
    c = load_recipe("gradual_magnitude", "")
    section, leaf = key.split(".")
    c[section][leaf] = value
    with pytest.raises(ValueError, match=match):
        experiment.check(c)


def test_config_unknown_key_added():
    c = load_recipe("base", "")
    c.train.unlock()
    c.train.extra = 1
    with pytest.raises(ValueError, match="train.extra"):
        experiment.check(c)


RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_validate(name):
    """Every recipe builds, and what it builds is what it says: model size, optimizer kind,
    mask method and its target sparsity; and a bad value in it is rejected by name."""
    import sparsejax

    c = load_recipe(name, "size=tiny")
    checked = experiment.check(c)
    wide = c.model.sparse_ift.family == "wide"  # Sparse Wide at s=0.75: d_model x 2
    assert checked.model_cfg.n_layer == 2 and checked.model_cfg.d_model == (128 if wide else 64)
    n = checked.model_cfg.d_model if wide else 8  # Wide's masks know its layers' shapes
    params = {"w": {"kernel": np.ones((n, n), np.float32)}}
    if c.sparsity.method == "block":  # one block of the recipe's size
        params = {"w": {"kernel": np.ones((c.model.block,) * 2, np.float32)}}
    if c.sparsity.method == "channels":  # the GPT's declared pair: MLP fc_in -> fc_out
        params = {"mlp": {k: {"kernel": np.ones((n, n), np.float32)} for k in ("fc_in", "fc_out")}}
    state = checked.tx.init(params)
    if c.sparsity.method == "dense":
        with pytest.raises(errors.NoSparsifyState):
            sparsejax.find_state(state)
        assert checked.sparsity_schedule is None
    elif checked.sparsity_schedule is None:  # N:M / DST methods: their own targets
        assert sparsejax.find_state(state).masks["w"]["kernel"].shape == (n, n)
    else:
        final = float(checked.sparsity_schedule(c.train.steps - 1))
        assert final == pytest.approx(c.sparsity.final)
        stats = sparsejax.sparsity_stats(state, params)
        assert stats.n_prunable == sum(np.size(x) for x in jax.tree.leaves(params))
        # static masks exist from init; gradual ones start dense
        at_init = c.sparsity.final if c.sparsity.method == "static" else 0.0
        assert float(stats.sparsity) == pytest.approx(at_init)
    assert float(checked.lr_schedule(c.train.warmup_steps)) == pytest.approx(c.train.lr)
    configlib.set_key(c, "train.b2", 1.5)
    with pytest.raises(ValueError, match="train.b2"):
        experiment.check(c)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("train.lr", float("inf"), "train.lr must be a finite float"),
        ("train.lr", float("nan"), "train.lr must be a finite float"),
        ("train.lr", 0.0, r"train.lr must be a finite float > 0"),
        ("train.b1", 1.0, r"train.b1 must be a float in \[0, 1\)"),
        ("train.b2", -0.5, r"train.b2 must be a float in \[0, 1\)"),
        ("train.steps", 99_999_999_999, "train.steps must be <= 2147483647"),
        ("sparsity.drop_fraction", 2.0, r"sparsity.drop_fraction must be in \(0, 1\]"),
        ("sparsity.hard_from", 0.0, "sparsity.warmup/hard_from"),
        ("sparsity.n", 5, "sparsity.n must be <= sparsity.m"),
        ("sparsity.n", 0, "sparsity.n must be an int >= 1"),  # trained an all-zero model
        ("model.size", "tinyy", "config model.size: variant must be one of"),
    ],
)
def test_training_value_errors(key, value, match):
    c = load_recipe("dense", "")
    configlib.set_key(c, key, value)
    with pytest.raises(ValueError, match=match):
        experiment.check(c)


def test_window_solve_memory_bound():
    c = load_recipe("gradual_magnitude", "")
    c.train.steps = 2_000_000_000  # the compute-placed window solve would need ~48 GB
    limit = mask_methods.physical_memory() // mask_methods.WINDOW_SOLVE_BYTES_PER_STEP
    if c.train.steps <= limit:
        pytest.skip(f"this machine could hold the solve for {c.train.steps} steps")
    with pytest.raises(ValueError, match="train.steps must be <= .* bytes per step"):
        experiment.check(c)
    c.sparsity.by = "steps"  # no solve: accepted
    experiment.check(c)


def test_one_alias_per_key():
    assert load_recipe("base", "final=0.5").sparsity.final == 0.5
    assert load_recipe("base", "sparsity.final=0.25").sparsity.final == 0.25
    with pytest.raises(ValueError, match="unknown config key 'sparsity'"):
        load_recipe("base", "sparsity=0.5")
    assert sorted(configlib.KEY_ALIASES) == ["final", "size", "steps"]
