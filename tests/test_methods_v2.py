"""Methods v2 (issue 27): unstructured STE, channel pruning, AC/DC and block pruning, each
on hand-worked cases (exact masks, phase boundaries, forward and backward values)."""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from flax import nnx

import sparsejax
from sparsejax import methods, schedules
from sparsejax.downstream import export
from sparsejax.errors import ConfigError
from sparsejax.methods.channels import GPT_PAIRS, channel_plan
from sparsejax.models.gpt import GPT, GPTConfig
from sparsejax.run import configlib, experiment, mask_methods

# |W| >= 9 are the 8 largest of 16: the hand-worked 50% magnitude mask
W4 = np.array([[1, -9, 3, 14],
               [-5, 11, -2, 7],
               [16, -4, 10, -8],
               [6, 13, -15, 12]], np.float32) / 4
M4 = np.array([[0, 1, 0, 1],
               [0, 1, 0, 0],
               [1, 0, 1, 0],
               [0, 1, 1, 1]], bool)


def _kernel(tree, name):
    return np.asarray(tree[name]["kernel"])


# ---- 1. unstructured STE ------------------------------------------------------------------

def test_ste_unstructured_forward_is_masked_and_backward_is_the_identity():
    params = {"layer": {"kernel": jnp.asarray(W4)}}
    tx = sparsejax.sparsify(optax.sgd(0.01), methods.ste_unstructured(0.5))
    state = tx.init(params)
    np.testing.assert_array_equal(_kernel(sparsejax.masks_of(state), "layer"), M4)
    x = np.array([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0]])
    y = np.array([[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.5, 0.5]])

    def loss(p):
        v = sparsejax.forward_params(p, state)["layer"]["kernel"]
        return 0.5 * jnp.sum((jnp.asarray(x, jnp.float32) @ v - y) ** 2)

    forward = sparsejax.forward_params(params, state)["layer"]["kernel"]
    np.testing.assert_array_equal(np.asarray(forward), W4 * M4)  # forward through the mask
    grads = jax.grad(loss)(params)
    # float64 reference: the gradient of the masked forward w.r.t. its (masked) weights,
    # handed to every dense weight unchanged (pruned ones too)
    ref = x.T @ (x @ (W4.astype(np.float64) * M4) - y)
    assert np.all(ref[~M4] != 0)
    np.testing.assert_allclose(_kernel(grads, "layer"), ref, rtol=1e-6, atol=1e-6)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    # dense weights keep training: every entry, pruned ones included, took the SGD step
    np.testing.assert_allclose(_kernel(new, "layer"), W4 - 0.01 * ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(_kernel(sparsejax.masks_of(state), "layer"), M4)
    # the next step's mask follows the moved weights: 1/4 + 5 is now the largest |W|, while
    # |14/4 - 5| = 1.5 falls below 9/4, the smallest kept
    move = np.zeros((4, 4), np.float32)
    move[0, 0], move[0, 3] = -500.0, 500.0  # x lr 0.01
    moved = {"layer": {"kernel": jnp.asarray(W4 - 0.01 * move)}}
    _, state = jax.jit(tx.update)({"layer": {"kernel": jnp.asarray(move)}}, state, moved)
    expected = M4.copy()
    expected[0, 0], expected[0, 3] = True, False
    np.testing.assert_array_equal(_kernel(sparsejax.masks_of(state), "layer"), expected)


def test_ste_unstructured_random_mask_is_drawn_once():
    params = {"layer": {"kernel": jnp.asarray(W4)}}
    tx = sparsejax.sparsify(optax.sgd(1.0), methods.ste_unstructured(0.5, score="random"))
    state = tx.init(params)
    first = _kernel(sparsejax.masks_of(state), "layer")
    p, update = params, jax.jit(tx.update)
    rng = np.random.default_rng(0)
    for _ in range(2):  # the weights move, the random mask stays
        g = {"layer": {"kernel": jnp.asarray(rng.standard_normal((4, 4)), jnp.float32)}}
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_array_equal(_kernel(sparsejax.masks_of(state), "layer"), first)
    assert first.sum() == 8 and not (first == M4).all()


def test_ste_unstructured_rejects_scores_it_cannot_use():
    with pytest.raises(ValueError, match="score must be one of"):
        methods.ste_unstructured(0.5, score="saliency")
    with pytest.raises(ValueError, match="sparsity must be in"):
        methods.ste_unstructured(1.0)


# ---- 2. channels --------------------------------------------------------------------------

def _mlp():
    scale = np.array([3, -1, 4, 1.5, -5, 9, 2, 6], np.float32)  # column norms 2|s|
    rng = np.random.default_rng(0)
    return {"layer1": {"kernel": jnp.asarray(np.ones((4, 8), np.float32) * scale),
                       "bias": jnp.zeros(8)},
            "layer2": {"kernel": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)}}


def test_channels_prune_whole_columns_and_the_next_layers_rows():
    params = _mlp()
    method = methods.channels(0.3, pairs={r"layer1/kernel": "layer2/kernel"})
    masks = sparsejax.masks_of(sparsejax.sparsify(optax.sgd(0.1), method).init(params))
    # round(0.3 * 8) = 2 channels pruned: the two smallest |s|, 1 and 1.5
    keep = np.array([1, 0, 1, 0, 1, 1, 1, 1], bool)
    np.testing.assert_array_equal(_kernel(masks, "layer1"), np.broadcast_to(keep, (4, 8)))
    np.testing.assert_array_equal(_kernel(masks, "layer2"),
                                  np.broadcast_to(keep[:, None], (8, 3)))  # outputs kept
    assert masks["layer1"]["bias"].ndim == 0  # biases are never pruned


@pytest.fixture(scope="module")
def tiny_gpt():
    """A tiny GPT (test_method_recipes' MICRO: 1 block, d_model 32, 2 heads, d_ff 64): its
    config and ``nnx.split``."""
    cfg = GPTConfig.from_variant("1,32,2,64")
    graphdef, state, rest = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    return cfg, graphdef, state, rest


@pytest.mark.slow
def test_channels_on_a_tiny_gpt_prune_mlp_neurons_only(tiny_gpt):
    params = nnx.to_pure_dict(tiny_gpt[2])
    plan = channel_plan(params, pairs=GPT_PAIRS)
    assert sorted(plan.producers) == ["blocks/0/mlp/fc_in/kernel"]
    assert plan.consumers["blocks/0/mlp/fc_out/kernel"] == ("blocks/0/mlp/fc_in/kernel", 0)
    assert "attention" in plan.skipped["blocks/0/attn/query/kernel"]
    masks = sparsejax.masks_of(sparsejax.sparsify(
        optax.sgd(0.1), methods.channels(0.25, pairs=GPT_PAIRS)).init(params))
    for b in (0,):
        w = np.asarray(params["blocks"][b]["mlp"]["fc_in"]["kernel"], np.float64)
        top = np.argsort(-np.linalg.norm(w, axis=0), kind="stable")[:48]  # 64 - 16
        keep = np.zeros(64, bool)
        keep[top] = True
        mlp = masks["blocks"][b]["mlp"]
        np.testing.assert_array_equal(np.asarray(mlp["fc_in"]["kernel"]),
                                      np.broadcast_to(keep, (32, 64)))
        np.testing.assert_array_equal(np.asarray(mlp["fc_out"]["kernel"]),
                                      np.broadcast_to(keep[:, None], (64, 32)))
        for proj in ("query", "key", "value", "out"):
            assert np.asarray(masks["blocks"][b]["attn"][proj]["kernel"]).all()


def test_channels_refuse_a_pair_that_does_not_fit():
    with pytest.raises(ValueError, match="matches no prunable leaf"):
        channel_plan(_mlp(), pairs={"nope": "layer2/kernel"})
    bad = {"a": {"kernel": jnp.ones((4, 8))}, "b": {"kernel": jnp.ones((6, 2))}}
    with pytest.raises(ValueError, match="no input axis of 8 rows"):
        channel_plan(bad, pairs={"a/kernel": "b/kernel"})


# ---- 3. AC/DC -----------------------------------------------------------------------------

#                  0    1    2    3    4    5    6    7    8    9    10   11
ACDC_SPARSE = [0, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1]  # warm-up 2, S2 D1, fine-tune from 8
ACDC_UPDATES = [2, 4, 5, 7, 8]


def test_acdc_phase_boundaries_and_magnitude_masks_at_each_sparse_start():
    method = methods.acdc(0.5, dense_steps=1, sparse_steps=2, warmup_steps=2, finetune_from=8)
    steps = jnp.arange(12)
    np.testing.assert_array_equal(np.asarray(method.target(steps)), 0.5 * np.array(ACDC_SPARSE))
    updates = [t for t in range(12) if bool(method.cadence.is_update_step(jnp.int32(t)))]
    assert updates == ACDC_UPDATES
    params = {"layer": {"kernel": jnp.asarray(W4)}}
    tx = sparsejax.sparsify(optax.sgd(1.0), method)
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(3)
    p, previous, starts = params, None, []
    for t in range(12):
        before = np.abs(np.asarray(p["layer"]["kernel"], np.float64))
        g = {"layer": {"kernel": jnp.asarray(rng.standard_normal((4, 4)), jnp.float32)}}
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
        mask = _kernel(sparsejax.masks_of(state), "layer")
        if not ACDC_SPARSE[t]:
            assert mask.all(), t
        elif t in ACDC_UPDATES:  # a new phase: the 8 largest |W| of the weights at step t
            expected = np.zeros(16, bool)
            expected[np.argsort(-before.ravel(), kind="stable")[:8]] = True
            np.testing.assert_array_equal(mask, expected.reshape(4, 4), err_msg=str(t))
            starts.append(mask)
        else:  # within a phase the mask holds
            np.testing.assert_array_equal(mask, previous, err_msg=str(t))
        if ACDC_SPARSE[t]:
            assert np.all(np.asarray(p["layer"]["kernel"])[~mask] == 0), t
        previous = mask
    assert len(starts) == 3 and not all((s == starts[0]).all() for s in starts)


def test_acdc_phases_in_the_config():
    c = tiny_config(sparsity__method="acdc", sparsity__final=0.5)
    configlib.apply_arg(c, "sparsity.acdc.warmup_steps=2,sparsity.acdc.dense_steps=1,"
                           "sparsity.acdc.sparse_steps=2,sparsity.acdc.finetune_steps=3")
    spec = configlib.validate(c)
    assert mask_methods.acdc_finetune_from(spec) == 5  # 8 steps - 3
    method = experiment.check(c).method
    assert [bool(method.cadence.is_update_step(jnp.int32(t))) for t in range(8)] == [
        False, False, True, False, True, True, False, False]  # D D S S | D | S S S
    c.sparsity.acdc.finetune_steps = 7
    with pytest.raises(ConfigError, match=r"sparsity\.acdc\.finetune_steps must be <= .* = 6 "):
        configlib.validate(c)
    c.sparsity.acdc.finetune_steps = 3
    c.sparsity.acdc.dense_steps = 0
    with pytest.raises(ConfigError, match=r"sparsity\.acdc\.dense_steps must be an int >= 1"):
        configlib.validate(c)


# ---- 4. block -----------------------------------------------------------------------------

def _tiles():
    w = np.zeros((8, 8), np.float32)
    w[1, 2] = 10.0          # tile (0, 0): l2 10, max 10
    w[:4, 4:] = 3.0         # tile (0, 1): l2 12, max 3
    w[4:, :4] = 1.0         # tile (1, 0): l2 4,  max 1
    w[5, 5] = w[6, 7] = 7.0  # tile (1, 1): l2 9.9, max 7
    return {"layer": {"kernel": jnp.asarray(w)}}


@pytest.mark.parametrize("pooling, kept_tiles", [("l2", [[1, 1], [0, 0]]),
                                                  ("max", [[1, 0], [0, 1]])])
def test_block_keeps_the_tiles_with_the_largest_pooled_scores(pooling, kept_tiles):
    method = methods.block(0.5, block=(4, 4), pooling=pooling)
    masks = sparsejax.masks_of(sparsejax.sparsify(optax.sgd(0.1), method).init(_tiles()))
    expected = np.kron(np.array(kept_tiles, bool), np.ones((4, 4), bool))
    np.testing.assert_array_equal(_kernel(masks, "layer"), expected)


def test_gradual_block_pruning_never_regrows_a_tile():
    """Random tile scores, redrawn at every update: only the restriction to active tiles
    keeps the kept sets nested."""
    sched = schedules.polynomial(0.75, 0, 3, update_every=1)
    tx = sparsejax.sparsify(optax.sgd(0.1), methods.block(0.75, block=(2, 2), score="random",
                                                          schedule=sched))
    p = _tiles()
    state = tx.init(p)
    history, update = [], jax.jit(tx.update)
    for _ in range(4):
        u, state = update(jax.tree.map(jnp.ones_like, p), state, p)
        p = optax.apply_updates(p, u)
        history.append(_kernel(sparsejax.masks_of(state), "layer")[::2, ::2].copy())
    # Zhu & Gupta's cubic ramp at steps 0..3: 0.75 (1 - (1 - t/3)^3) of the 16 tiles pruned
    pruned = [round(0.75 * (1 - (1 - t / 3) ** 3) * 16) for t in range(4)]
    assert pruned == [0, 8, 12, 12]
    assert [16 - int(h.sum()) for h in history] == pruned
    for a, b in zip(history, history[1:], strict=False):
        assert not (b & ~a).any()  # a pruned tile never returns
    np.testing.assert_array_equal(history[3], history[2])


def test_block_config_refuses_a_block_that_does_not_tile_the_model():
    c = tiny_config(sparsity__method="block", sparsity__final=0.5, model__block=48)
    with pytest.raises(ConfigError, match=r"model\.block must be a divisor of d_model \(64\)"):
        configlib.validate(c)
    c.model.block = 32
    c.sparsity.pooling = "mean"
    with pytest.raises(ConfigError, match=r"sparsity\.pooling must be one of \('l2', 'max'\)"):
        configlib.validate(c)


@pytest.mark.slow
def test_block_masks_export_to_bsr_and_reload_with_equal_logits(tmp_path, tiny_gpt):
    cfg, graphdef, state, rest = tiny_gpt
    graphdef, state, rest = nnx.split(nnx.merge(graphdef, state, rest), nnx.Param, ...)  # a copy
    params = nnx.to_pure_dict(state)
    opt = sparsejax.sparsify(optax.sgd(0.1), methods.block(0.5, block=(16, 16))).init(params)
    pruned = jax.tree.map(lambda p, m: np.asarray(p) * np.asarray(m), params,
                          sparsejax.masks_of(opt))
    exported = export.export_params(pruned, "bsr", block=(16, 16))
    mats = {k: v for k, v in exported.items() if isinstance(v, export.BSRMatrix)}
    assert len(mats) == 6  # q, k, v, out, fc_in, fc_out
    for name, mat in mats.items():
        grid = mat.layout.grid
        assert mat.layout.nnz == grid[0] * grid[1] // 2, name  # exactly half the tiles
    path = export.save_export(tmp_path / "e.npz", exported, {"model": dataclasses.asdict(cfg)})
    nnx.replace_by_pure_dict(state, pruned)
    ref = np.asarray(nnx.merge(graphdef, state, rest)(jnp.arange(32)[None] % 256))
    tokens = jnp.arange(32)[None] % 256
    # decompressed from the BSR blocks: bit for bit (the BSRLinear path is
    # test_downstream.py::test_export_load_export_logits_equal's)
    np.testing.assert_array_equal(np.asarray(export.load_export(path, kernels=False)(tokens)),
                                  ref)


# ---- 5. recipes -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, method", [
    ("ste_unstructured", "ste_unstructured/magnitude/uniform"),
    ("channels", "channels/magnitude/gradual"),
    ("block", "block/32x32/l2/magnitude/gradual"),
    ("acdc", "acdc/magnitude/30s30d"),
])
def test_new_recipes_validate_build_and_document_their_run(name, method):
    """Training them is recorded in each docstring (too slow for the suite's budget); here each
    recipe builds its method and states its command, time and result."""
    from test_method_recipes import ROOT

    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("size=tiny")
    assert experiment.check(c).method.name == method
    doc = mod.__doc__
    assert f"--config configs/{name}.py:size=tiny" in doc
    assert "Time:      " in doc and "validation loss" in doc


@pytest.mark.slow
@pytest.mark.parametrize("name", ["acdc", "block", "channels", "ste_unstructured"])
def test_new_methods_stay_exact_under_multisteps_with_packed_masks(name):
    """A stack none of the hand-worked tests use: ``optax.MultiSteps`` around ``sparsify``
    with bit-packed masks, 9 micro-steps (4 updates) through ``forward_params``: no pruned
    weight is non-zero (``check``), the masks read back as bool at the method's density."""
    method = {"acdc": methods.acdc(0.5, dense_steps=2, sparse_steps=2),
              "block": methods.block(0.5, block=(4, 4)),
              "channels": methods.channels(0.5),
              "ste_unstructured": methods.ste_unstructured(0.5)}[name]
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    params = {"a": {"kernel": jax.random.normal(k[0], (16, 24))},
              "b": {"kernel": jax.random.normal(k[1], (24, 12)), "bias": jnp.ones(12)}}

    def loss(p):
        return jnp.sum((jnp.ones((4, 16)) @ p["a"]["kernel"] @ p["b"]["kernel"]
                        + p["b"]["bias"]) ** 2)

    tx = optax.MultiSteps(sparsejax.sparsify(optax.adamw(1e-2), method, packed_masks=True), 2)
    state = tx.init(params)
    p = sparsejax.prune(params, state)

    @jax.jit
    def step(p, state):
        u, state = tx.update(jax.grad(loss)(sparsejax.forward_params(p, state)), state, p)
        return optax.apply_updates(p, u), state

    for _ in range(9):
        p, state = step(p, state)
    assert sum(int(v) for v in jax.tree_util.tree_leaves(sparsejax.check(p, state))) == 0
    a = sparsejax.masks_of(state)["a"]["kernel"]
    assert a.dtype == jnp.bool_ and a.shape == (16, 24) and float(np.mean(a)) == 0.5
    assert np.isfinite(float(loss(p)))
