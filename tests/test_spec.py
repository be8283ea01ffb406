"""The run spec (the config read once, typed) and the mask-method registry (a method is added
in one place)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from conftest import tiny_config

from sparsejax import methods
from sparsejax.errors import ConfigError
from sparsejax.run import build, configlib, experiment, mask_methods
from sparsejax.run.spec import RunSpec, SparsitySpec


def test_base_is_the_spec_defaults_and_validate_returns_the_spec():
    spec = configlib.validate(configlib.base())
    assert spec == RunSpec()
    assert spec.to_dict() == configlib.base().to_dict()
    c = configlib.base()
    c.train.lr = 1  # an int where the schema has a float: read as a float
    c.seed = 5
    spec = configlib.validate(c)
    assert isinstance(spec.train.lr, float) and spec.train.lr == 1.0 and spec.seed == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1  # type: ignore[misc]
    assert spec.replace(seed=2).seed == 2 and spec.seed == 5


@pytest.mark.parametrize("key, value, match", [
    ("data.source", 3, "config.data.source must be a string"),
    ("wandb.enabled", "yes", "config.wandb.enabled must be a bool"),
    ("train.steps", 2.5, "config.train.steps must be an int"),
    ("train.lr", float("nan"), "config.train.lr must be a finite float"),
])
def test_validate_checks_every_type_by_the_schema(key, value, match):
    c = configlib.base()
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(ConfigError, match=match):
        configlib.validate(c)


def test_every_registered_method_declares_real_keys_and_builds():
    fields = {f.name for f in dataclasses.fields(SparsitySpec)}
    assert set(mask_methods.names()) == {"dense", "static", "gradual", "nm", "ste", "sr_ste",
                                         "mdgf", "sdgf", "set", "rigl", "ste_unstructured",
                                         "channels", "block", "acdc"}
    for name, entry in mask_methods.REGISTRY.items():
        assert set(entry.keys) <= fields, name
        c = tiny_config(sparsity__method=name, sparsity__final=0.5, sparsity__alpha=0.1,
                        sparsity__allocation="uniform", sparsity__n=1, sparsity__m=4,
                        sparsity__update_every=1, sparsity__acdc__warmup_steps=2,
                        sparsity__acdc__dense_steps=1, sparsity__acdc__sparse_steps=1,
                        sparsity__acdc__finetune_steps=2)
        assert experiment.check(c).method is not None, name


@pytest.fixture
def toy_method():
    """A method registered by a test (and removed after it): static random pruning whose
    sparsity is half of sparsity.final, refusing final > 0.8 by name."""

    def check(spec):
        mask_methods.need(spec.sparsity.final <= 0.8, "sparsity.final", "<= 0.8 for toy",
                          spec.sparsity.final)

    entry = mask_methods.register(mask_methods.MethodEntry(
        "toy", ("final",),
        lambda spec, t: methods.static(t.sparsity / 2, score="random", allocation="uniform"),
        check=check, trains_final=True))
    yield entry
    del mask_methods.REGISTRY["toy"]


def test_a_method_registered_in_one_place_is_validated_and_trained(toy_method):
    c = tiny_config(sparsity__method="toy", sparsity__final=0.5)
    blueprint = experiment.check(c)  # the schema accepts it, the builder builds it
    params = {"w": {"kernel": np.ones((8, 8), np.float32)}}
    state = blueprint.tx.init(params)
    import sparsejax

    masks = jax.device_get(sparsejax.masks_of(state))
    assert int(masks["w"]["kernel"].sum()) == 64 - 16  # 0.5 / 2 of 64 pruned
    with pytest.raises(ConfigError, match=r"config.sparsity.final must be <= 0.8 for toy"):
        configlib.validate(tiny_config(sparsity__method="toy", sparsity__final=0.9))
    with pytest.raises(ConfigError, match=r"sparsity.final must be > 0 for a sparse method"):
        configlib.validate(tiny_config(sparsity__method="toy", sparsity__final=0.0))
    with pytest.raises(ValueError, match="already registered"):
        mask_methods.register(toy_method)


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(ConfigError, match=r"sparsity.method must be one of \('dense', 'static'"):
        configlib.validate(tiny_config(sparsity__method="magic"))


def test_sparse_wide_plan_is_computed_once_and_used_everywhere(monkeypatch):
    """model_config, targets and the BSR factory all take the one WidePlan."""
    c = tiny_config(model__sparse_ift__family="wide", model__sparse_ift__sparsity=0.5,
                    sparsity__method="static", sparsity__final=0.5)
    spec = configlib.validate(c)
    calls = []
    real = build.sparse_ift.plan_wide
    monkeypatch.setattr(build.sparse_ift, "plan_wide",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    bp = build.blueprint(spec)
    assert len(calls) == 1
    assert (bp.model_cfg.d_model, bp.model_cfg.d_ff) == (bp.wide.wide.d_model, bp.wide.wide.d_ff)
    t = build.targets(spec, bp.wide)
    assert t.sparsity == pytest.approx(bp.wide.sparsity) and t.sparsity > 0.5
