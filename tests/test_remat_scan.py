"""Remat and scan over layers (``model.remat``, ``model.scan``): the same loss, gradients and
hidden states as the plain loop, the same params tree, what each policy saves, a program whose
size does not grow with depth, and the refusals (BSR layers cannot be scanned)."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from pallas_kernels.layers import bsr_linear_factory, nm_linear_factory
from sparsejax import calibration, errors
from sparsejax.models import GPT, GPTConfig, loss_fn
from sparsejax.run import configlib, experiment

pytestmark = pytest.mark.slow  # compiles whole train steps

SMALL = dict(n_layer=3, d_model=32, n_head=4, d_ff=64, vocab_size=64, n_ctx=16)
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)


def _split(**kw):
    model = GPT(GPTConfig(**{**SMALL, **kw}), rngs=nnx.Rngs(0))
    return nnx.split(model, nnx.Param, ...)


def _loss_and_grads(**kw):
    graphdef, params, rest = _split(**kw)
    y = jnp.roll(TOKENS, -1, 1)
    loss = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), TOKENS, y))
    return params, jax.jit(loss)(params)


@pytest.fixture(scope="module")
def plain():
    return _loss_and_grads()


@pytest.mark.parametrize("remat, scan", [("full", False), ("none", True), ("dots_saveable", True)])
def test_same_loss_and_gradients_and_params_tree(plain, remat, scan):
    params0, (loss0, grads0) = plain
    params, (loss, grads) = _loss_and_grads(remat=remat, scan=scan)
    assert jax.tree.structure(params) == jax.tree.structure(params0)  # blocks/<i>/... kept
    jax.tree.map(np.testing.assert_array_equal, params, params0)
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads, grads0)


def test_scan_gives_every_blocks_hidden_state():
    run = nnx.jit(lambda m, t: m.hidden_states(t))
    logits0, h0 = run(GPT(GPTConfig(**SMALL), rngs=nnx.Rngs(0)), TOKENS)
    logits, h = run(GPT(GPTConfig(**SMALL, scan=True, remat="full"), rngs=nnx.Rngs(0)), TOKENS)
    assert len(h) == len(h0) == SMALL["n_layer"]
    np.testing.assert_allclose(logits, logits0, rtol=1e-5, atol=1e-6)
    for a, b in zip(h, h0, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _saved(remat: str) -> str:
    graphdef, params, rest = _split(remat=remat)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda p: loss_fn(nnx.merge(graphdef, p, rest), TOKENS, TOKENS),
                              params)
    return out.getvalue()


def test_policies_save_what_they_name():
    full, dots, no_batch = (_saved(r) for r in ("full", "dots_saveable",
                                                "dots_with_no_batch_dims_saveable"))
    named = "named 'linear_out'"
    assert named not in full and "output of dot_general" not in full
    assert dots.count(named) >= 2 * SMALL["n_layer"]  # linear outputs (custom_vjp matmuls)
    assert "output of dot_general" in dots  # and the attention's batched score matmuls
    assert no_batch.count(named) == dots.count(named)
    assert "output of dot_general" not in no_batch
    assert len(_saved("none").splitlines()) > len(dots.splitlines()) > len(full.splitlines())


def test_scanned_program_does_not_grow_with_depth():
    def matmuls(n_layer: int, scan: bool) -> int:
        cfg = GPTConfig(**{**SMALL, "n_layer": n_layer}, scan=scan)
        graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))),
                                           nnx.Param, ...)
        grad = jax.grad(lambda p, x: loss_fn(nnx.merge(graphdef, p, rest), x, x))
        text = jax.jit(grad).trace(params, TOKENS).lower().as_text()
        return text.count("stablehlo.dot_general")

    assert matmuls(2, scan=True) == matmuls(6, scan=True)
    assert matmuls(6, scan=False) > 2 * matmuls(2, scan=False)


def test_nm_layers_scan_and_bsr_layers_are_refused():
    cfg = GPTConfig(**{**SMALL, "n_layer": 2})
    run = nnx.jit(lambda m, t: m(t))
    nm = nm_linear_factory(2, 4)
    want = run(GPT(cfg, rngs=nnx.Rngs(0), linear=nm), TOKENS)
    got = run(GPT(GPTConfig(**{**vars(cfg), "scan": True}), rngs=nnx.Rngs(0), linear=nm), TOKENS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    bsr = GPT(GPTConfig(**{**vars(cfg), "scan": True}), rngs=nnx.Rngs(0),
              linear=bsr_linear_factory((16, 16), 0.5))
    with pytest.raises(ValueError, match="scan needs blocks of one structure.*BSR"):
        run(bsr, TOKENS)


def test_calibration_statistics_pass_through_scan_and_remat():
    batches = [np.asarray(TOKENS)]
    want = calibration.activation_norms(GPT(GPTConfig(**SMALL), rngs=nnx.Rngs(0)), batches)
    for kw in (dict(scan=True), dict(remat="full")):
        got = calibration.activation_norms(GPT(GPTConfig(**SMALL, **kw), rngs=nnx.Rngs(0)),
                                           batches)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), got, want)


@pytest.mark.parametrize("key, value, match", [
    ("model.remat", "dots", r"model.remat must be one of \('none', 'full', 'dots_saveable'"),
    ("model.remat", "", "model.remat must be one of"),
    ("model.attention", "flash", r"model.attention must be one of \('auto', 'xla', 'cudnn'\)"),
    ("model.scan", "maybe", "model.scan"),
])
def test_bad_values_are_refused_by_name(key, value, match):
    c = configlib.base()
    with pytest.raises(errors.ConfigError, match=match):
        configlib.set_key(c, key, value)
        configlib.validate(c)


@pytest.mark.parametrize("overrides, match", [
    ("model.scan=true,model.linear=bsr,sparsity.method=static,sparsity.score=random,"
     "sparsity.final=0.5,model.block=16", "model.scan/model.linear must be False with "
                                          "model.linear='bsr'"),
    ("model.attention=cudnn", "model.attention/model.dtype must be 'auto' or 'xla' with "
                              "model.dtype='float32'"),
])
def test_incompatible_combinations_name_both_keys(overrides, match):
    c = configlib.apply_arg(configlib.base(), overrides)
    with pytest.raises(errors.ConfigError, match=match):
        configlib.validate(c)


def test_cudnn_on_this_cpu_is_refused_before_the_run_builds():
    c = configlib.apply_arg(configlib.base(), "model.attention=cudnn,model.dtype=bfloat16,"
                                              "model.size=XS")  # head dim 32
    spec = configlib.validate(c)  # valid as a config (it may run on another machine) ...
    experiment.check(spec)
    with pytest.raises(errors.ConfigError, match="model.attention.*NVIDIA GPUs only"):
        experiment.build(spec)  # ... refused where the model would be built


def test_accelerator_keys_are_not_part_of_a_runs_identity():
    """A run dir written before the keys existed, or resumed with other values, still
    matches: they change how the model computes, not its params or results."""
    old = configlib.base().to_dict()
    for key in ("attention", "remat", "scan"):
        del old["model"][key]
    new = configlib.apply_arg(configlib.base(), "model.remat=full,model.scan=true")
    assert configlib.differing_keys(old, new.to_dict()) == []
    new.model.dtype = "bfloat16"
    assert configlib.differing_keys(old, new.to_dict()) == ["model.dtype"]
