"""Sparse-IFT (Thangarasa et al., 2023): formulas, iso-FLOP layers, masks, training, BSR path.

Structure checks (prunable leaves, FLOPs, shapes) run on abstract one-block GPTs
(``nnx.eval_shape``: no weights, no compilation); FLOP expectations are worked by hand from
the paper's formulas. Each family trains once, as cheaply as its point allows: Parallel and
Factorized with masked weights in a direct loop, Wide on the BSR kernels, Doped through the
config path (``model.sparse_ift`` with ``experiment.run`` and ``sparsify``).
"""

from __future__ import annotations

import dataclasses
import doctest
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from flax import nnx

from sparsejax.models import sparse_ift
from sparsejax.models.gpt import GPT, GPTConfig, loss_fn
from sparsejax.prunable import path_str, prunable_tree
from sparsejax.run import accounting, build, configlib, experiment

S = 0.75
CFG = GPTConfig.from_variant("1,16,2,32", n_ctx=16, vocab_size=32)  # L, d, n_head, ff
STEPS = 12
FAMILIES = sparse_ift.FAMILIES  # wide, parallel, factorized, doped
LAYER_FAMILIES = sparse_ift.LAYER_FAMILIES


def test_doctests():
    assert doctest.testmod(sparse_ift).failed == 0


def test_helper_formulas_by_hand():
    assert [sparse_ift.parallel_branches(s) for s in (0.0, 0.5, 0.75, 0.8, 0.9)] == [1, 2, 4, 5, 10]
    # ceil(64·256 / (0.25·320)) = ceil(204.8); ceil(16·16 / (0.5·32)) = 16 exactly (no float slop)
    assert sparse_ift.factorized_rank(64, 256, 0.75) == 205
    assert sparse_ift.factorized_rank(16, 16, 0.5) == 16
    assert sparse_ift.factorized_rank(64, 256, 0.75, multiple=32) == 224
    # floor(0.75·64·256 / 320) = floor(38.4); floor(0.5·16·16/32) = 4
    assert sparse_ift.doped_rank(64, 256, 0.75) == 38
    assert sparse_ift.doped_rank(16, 16, 0.5) == 4
    assert sparse_ift.wide_factor(0.75) == 2.0
    assert sparse_ift.wide_factor(0.0) == 1.0
    assert sparse_ift.wide_dims(64, 256, 0.75, multiple=4) == (128, 512)
    assert sparse_ift.wide_dims(64, 256, 0.5, multiple=4) == (92, 364)  # 90.51, 362.04 up


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, True, "0.5", float("nan")])
def test_bad_sparsity_is_refused(bad):
    for fn in (sparse_ift.parallel_branches, sparse_ift.wide_factor,
               lambda s: sparse_ift.factorized_rank(4, 4, s),
               lambda s: sparse_ift.doped_rank(4, 4, s),
               lambda s: sparse_ift.factory("parallel", s)):
        with pytest.raises(ValueError, match=r"sparsity must be a float in \[0, 1\)"):
            fn(bad)
    with pytest.raises(ValueError, match="family must be one of"):
        sparse_ift.factory("deep", 0.5)


@pytest.mark.parametrize("d_in,d_out", [(64, 64), (64, 256), (256, 64), (768, 3072)])
@pytest.mark.parametrize("s", [0.5, 0.75, 0.9])
def test_layer_flops_iso_within_one_percent(d_in, d_out, s):
    dense = 2.0 * d_in * d_out
    rho = 1.0 - s
    k = round(1 / rho)
    r_f = math.ceil(d_in * d_out / (rho * (d_in + d_out)) - 1e-9)
    r_d = math.floor(s * d_in * d_out / (d_in + d_out) + 1e-9)
    want = {"parallel": 2 * k * rho * d_in * d_out, "factorized": 2 * rho * r_f * (d_in + d_out),
            "doped": 2 * rho * d_in * d_out + 2 * r_d * (d_in + d_out)}
    # iso up to the rounding of k or r: a rank step is (d_in + d_out) weights, times 1 - s
    # when they are sparse; under 1% for GPT-2-small-sized layers (768 x 3072)
    bound = {"parallel": 1e-12, "factorized": rho * (1 / d_in + 1 / d_out),
             "doped": 1 / d_in + 1 / d_out}
    for family, value in want.items():
        got = sparse_ift.layer_flops(family, d_in, d_out, s)
        assert got == pytest.approx(value, rel=1e-12)
        assert abs(got / dense - 1) <= bound[family], (family, got / dense)
        assert d_in < 768 or abs(got / dense - 1) < 0.01
    wide = sparse_ift.layer_flops("wide", d_in, d_out, s)  # unrounded widths: exactly iso
    assert wide == pytest.approx(dense, rel=1e-12)


def _model(family: str, cfg: GPTConfig = CFG) -> GPT:
    if family == "wide":
        return GPT(sparse_ift.widen(cfg, S), rngs=nnx.Rngs(0))
    return GPT(cfg, rngs=nnx.Rngs(0), linear=sparse_ift.factory(family, S))


def _abstract(family: str) -> GPT:
    return nnx.eval_shape(lambda: _model(family))


def _params(model: GPT):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _batch():
    x = (np.arange(4)[:, None] * 3 + np.arange(CFG.n_ctx)[None]) % CFG.vocab_size
    return jnp.asarray(x, jnp.int32), jnp.asarray((x + 1) % CFG.vocab_size, jnp.int32)


def _leaves(tree):
    return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _kept(p, keep: bool, s: float = S) -> int:
    """Entries a uniform mask at ``s`` keeps (exact counts: n - round(s·n)); all if dense."""
    n = math.prod(p.shape)
    return n - round(s * n) if keep else n


def _train(model: GPT, masks=None, steps: int = STEPS) -> list[float]:
    """Adam (lr 1e-2) on one learnable batch (next token = token + 1); ``masks`` (bool leaves
    or True) multiply the weights in the forward pass. Returns the losses."""
    x, y = _batch()
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    params, params_def = nnx.to_pure_dict(state), jax.tree_util.tree_structure(state)
    masks = jax.tree.map(lambda _: True, params) if masks is None else masks
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            p = jax.tree.map(lambda w, m: w * m, p, masks)
            return loss_fn(nnx.merge(graphdef, jax.tree_util.tree_unflatten(
                params_def, jax.tree.leaves(p)), rest), x, y)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    losses, opt_state = [], tx.init(params)
    for _ in range(steps):
        params, opt_state, value = step(params, opt_state)
        losses.append(float(value))
    return losses


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_only_on_sparse_parts(family):
    """sparsify's default predicate selects every sparse part and nothing else."""
    params = _leaves(_params(_abstract(family)))
    chosen = {k for k, v in _leaves(prunable_tree(_params(_abstract(family)))).items() if v}
    weights = {k for k, p in params.items() if len(p.shape) >= 2 and k.startswith("blocks/")}
    lowrank = {k for k in weights if "/lowrank/" in k}
    assert chosen == weights - lowrank
    want = {"wide": 6, "parallel": 6 * 4, "factorized": 6 * 2, "doped": 6}[family]
    assert len(chosen) == want  # q, k, v, out, fc_in, fc_out: 4 branches, U and V, W
    assert len(lowrank) == (12 if family == "doped" else 0)  # u, v of each


@pytest.mark.parametrize("family", FAMILIES)
def test_built_layers_are_iso_flop(family):
    """2 × active weights of each built layer under uniform masks at S, by hand."""
    params = _params(_abstract(family))
    per_layer: dict[str, int] = {}
    prunable = _leaves(prunable_tree(params))
    for k, p in _leaves(params).items():
        if k.startswith("blocks/") and len(p.shape) >= 2:
            keep = prunable[k]
            layer = "/".join(k.split("/")[2:4])  # attn/query
            per_layer[layer] = per_layer.get(layer, 0) + 2 * _kept(p, keep)
    d, ff = CFG.d_model, CFG.d_ff
    dims = {"attn/query": (d, d), "attn/key": (d, d), "attn/value": (d, d), "attn/out": (d, d),
            "mlp/fc_in": (d, ff), "mlp/fc_out": (ff, d)}
    assert sorted(per_layer) == sorted(dims)
    wide = sparse_ift.widen(CFG, S)
    assert (wide.d_model, wide.d_ff) == (32, 64)  # 16·2, 32·2: multiples of 2·n_head, n_head
    for layer, flops in per_layer.items():
        d_in, d_out = dims[layer]
        n = d_in * d_out
        # by hand for d=16, ff=32, s=0.75 (every count below divisible by 4: no rounding):
        # wide: the 4x larger layer at 1/4; parallel: 4 branches at 1/4; factorized:
        # r = ceil(d_in·d_out/(.25(d_in+d_out))) = 32 (16x16), 43 (16x32); doped: W at 1/4
        # plus dense r(d_in+d_out), r = floor(.75 d_in d_out/(d_in+d_out)) = 6, 8
        r_f, r_d = {256: (32, 6), 512: (43, 8)}[n]
        want = {"wide": 2 * n, "parallel": 2 * n,
                "factorized": 2 * (r_f * d_in + r_f * d_out) // 4,
                "doped": 2 * (n // 4 + r_d * (d_in + d_out))}[family]
        assert flops == want, (layer, flops, want)
        assert flops == pytest.approx(sparse_ift.layer_flops(
            family, d_in, d_out, S, widened=(2 * d_in, 2 * d_out)), rel=1e-12)
        assert abs(flops / (2 * n) - 1) < 0.07  # 16-wide layers: rounding of r is coarse


@pytest.mark.parametrize("family", FAMILIES)
def test_model_flops_and_shapes(family):
    x, _ = _batch()
    out = nnx.eval_shape(lambda: _model(family)(x))
    assert out.shape == (4, CFG.n_ctx, CFG.vocab_size)
    model = _abstract(family)
    ctx, L, d, ff, V = CFG.n_ctx, 1, 16, 32, 32
    fixed = 4 * L * ctx * d + 2 * d * V  # attention scores + LM head of the dense model
    blocks = 2 * (4 * d * d + 2 * d * ff)
    got = accounting.model_forward_flops(model, ctx, density=1 - S)
    if family == "wide":  # everything but the weights grows with d' = 32
        want = accounting.flops_per_token(L, 32, 64, ctx, V, sparsity=S)
        assert want == blocks + 4 * L * ctx * 32 + 2 * 32 * V
    else:
        rank_terms = {"parallel": 0, "factorized": 0,
                      "doped": 2 * (4 * 6 * 32 + 2 * 8 * 48)}[family]  # dense u, v (r = 6, 8)
        maskable = {"parallel": 4 * (4 * d * d + 2 * d * ff),
                    "factorized": 4 * 32 * 32 + 2 * 43 * 48,
                    "doped": 4 * d * d + 2 * d * ff}[family]
        want = fixed + rank_terms + 2 * maskable * (1 - S)
    assert got == pytest.approx(want, rel=1e-12)
    assert abs(got / (fixed + blocks) - 1) < (0.6 if family == "wide" else 0.03)


@pytest.mark.slow
def test_short_masked_training_lowers_the_loss():
    """Parallel and Factorized (one model whose linears alternate between them: one compile
    instead of two) train under uniform random masks at S: the loss drops."""
    factories = {f: sparse_ift.factory(f, S) for f in ("parallel", "factorized")}
    order = iter(["parallel", "factorized"] * 3)  # query, key, value, out, fc_in, fc_out

    def linear(*args, **kwargs):
        return factories[next(order)](*args, **kwargs)

    model = GPT(CFG, rngs=nnx.Rngs(0), linear=linear)
    assert isinstance(model.blocks[0].attn.query, sparse_ift.SparseParallel)
    assert isinstance(model.blocks[0].attn.key, sparse_ift.SparseFactorized)
    params = _params(model)
    rng = np.random.default_rng(0)

    def mask(p, keep):  # uniform random masks at S on the prunable leaves
        if not keep:
            return True
        flat = np.zeros(p.size, bool)
        flat[rng.permutation(p.size)[: _kept(p, True)]] = True
        return jnp.asarray(flat.reshape(p.shape))

    losses = _train(model, jax.tree.map(mask, params, prunable_tree(params)))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.slow
def test_config_path_trains_and_accounts(tmp_path):
    """model.sparse_ift through tiny_config and experiment.run (sparsify with static random
    uniform masks), Doped at 0.5: sparsify masks exactly the sparse parts (n_prunable leaves
    the dense low-rank out), reported FLOPs and N follow the transformed layers, loss drops."""
    s = 0.5
    c = tiny_config(model__sparse_ift__family="doped", model__sparse_ift__sparsity=s,
                    sparsity__method="static", sparsity__final=s, sparsity__allocation="uniform",
                    checkpoint__every=8, train__log_every=4, model__size="1,64,4,256")
    summary = experiment.run(c, str(tmp_path / "run"), progress=False)
    assert summary["status"] == "completed"
    L, d, ff, ctx, V = 1, 64, 256, 32, 256
    r_dd, r_df = 16, 25  # floor(.5·64·64/128), floor(.5·64·256/320) = floor(25.6)
    maskable = L * (4 * d * d + 2 * d * ff)
    lowrank = L * (4 * r_dd * 2 * d + 2 * r_df * (d + ff))
    per_token = 2 * maskable * (1 - s) + 2 * lowrank + 4 * L * ctx * d + 2 * d * V
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    last = records[-1]
    assert last["sparsity"] == pytest.approx(s, abs=1e-6)
    assert last["flops"] == pytest.approx(3 * per_token * 8 * 4 * ctx, rel=1e-5)
    assert summary["n_prunable"] == maskable
    assert last["n_active"] == summary["n_params"] - maskable // 2
    assert last["n_avg"] == pytest.approx(last["n_active"])
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.1


def test_wide_layers_iso_flop_through_the_config():
    """Sparse Wide at s = 0.5 rounds the widths up (tiny: 90.5 -> 96, 362 -> 364), so one
    sparsity for all layers would miss iso-FLOP (attention +12.5%); the config's masks give
    every widened layer its own share: each within 1% of its dense layer's FLOPs (by hand:
    2·d_in·d_out), and the reported total target is wide_sparsity. GPT-2 small's widths
    (768 -> 1104, 3072 -> 4356) by the same arithmetic, without drawing masks."""
    s, d, ff = 0.5, 64, 256
    c = tiny_config(model__sparse_ift__family="wide", model__sparse_ift__sparsity=s,
                    sparsity__method="static", sparsity__final=s, model__size=f"1,{d},4,{ff}")
    wide = experiment.check(c).model_cfg
    assert (wide.d_model, wide.d_ff) == (96, 364)
    shapes = {"q": (96, 96), "in": (96, 364), "out": (364, 96)}
    dense = {"q": d * d, "in": d * ff, "out": d * ff}
    scores = {k: jnp.asarray(np.random.default_rng(0).random(v), jnp.float32)
              for k, v in shapes.items()}
    spec = configlib.validate(c)
    select = build.targets(spec, build.wide_plan(spec)).allocation
    masks = jax.jit(lambda sc: select(sc, None, dict.fromkeys(shapes, True)))(scores)
    for k, m in masks.items():
        assert int(m.sum()) == pytest.approx(dense[k], rel=0.01), k
    assert build.targets(spec, build.wide_plan(spec)).sparsity == pytest.approx(
        1 - (4 * d * d + 2 * d * ff) / (4 * 96**2 + 2 * 96 * 364), rel=1e-12)
    assert (1 - s) * 96**2 / (d * d) == pytest.approx(1.125)  # the miss one s would make

    small = GPTConfig.from_variant("12,768,12,3072")
    big = sparse_ift.widen(small, s)
    assert (big.d_model, big.d_ff) == (1104, 4356)  # 1086.1 up to 24s, 4344.5 up to 12s
    share = sparse_ift.wide_layer_sparsity(768, 3072, 1104, 4356)
    for (i, o), n in {(1104, 1104): 768**2, (1104, 4356): 768 * 3072,
                      (4356, 1104): 768 * 3072}.items():
        kept = i * o - round(share(i, o) * i * o)  # masks.layerwise's exact count
        assert kept == pytest.approx(n, rel=0.01)


def test_config_validation():
    c = configlib.base()
    configlib.apply_arg(c, "model.sparse_ift.family=wide,model.sparse_ift.sparsity=0.5")
    with pytest.raises(ValueError, match="sparsity.method must be one of"):
        configlib.validate(c)
    configlib.apply_arg(c, "sparsity.method=rigl,sparsity.final=0.75,sparsity.allocation=erk")
    with pytest.raises(ValueError, match="sparsity.final must be model.sparse_ift.sparsity"):
        configlib.validate(c)
    configlib.apply_arg(c, "model.sparse_ift.sparsity=1.0")
    with pytest.raises(ValueError, match=r"model.sparse_ift.sparsity must be a float in \[0, 1\)"):
        configlib.validate(c)
    configlib.apply_arg(c, "model.sparse_ift.family=deep")
    with pytest.raises(ValueError, match="model.sparse_ift.family must be one of"):
        configlib.validate(c)
    c = configlib.base()
    configlib.apply_arg(c, "model.sparse_ift.sparsity=0.5")
    with pytest.raises(ValueError, match="0.0 unless model.sparse_ift.family is set"):
        configlib.validate(c)


def _bsr_config(family: str):
    c = configlib.apply_arg(configlib.base(), (
        f"model.sparse_ift.family={family},model.sparse_ift.sparsity=0.5,model.block=16,"
        "model.linear=bsr,sparsity.method=static,sparsity.score=random,sparsity.final=0.5,"
        "model.n_ctx=16,train.seq_len=16"))
    configlib.set_key(c, "model.size", "1,32,2,64")
    return c, dataclasses.replace(experiment.check(c).model_cfg, vocab_size=CFG.vocab_size)


@pytest.mark.slow
def test_bsr_wide_trains():
    """model.linear=bsr, Sparse Wide at 0.5: widths rounded to the block (16), the BSR layers
    at block density 1/2 (Wide's 48x48 layers have 9 blocks, 4 kept), counted by the
    accounting; it trains on the kernels' CPU path (loss drops)."""
    c, cfg = _bsr_config("wide")
    assert (cfg.d_model, cfg.d_ff) == (48, 96)  # 45.3, 90.5 up to multiples of 16
    model = GPT(cfg, rngs=nnx.Rngs(0), linear=build.linear_factory(c))
    stats = accounting.structural_stats(model, _params(model))
    # each layer keeps its iso-FLOP share of 16x16 blocks: 32·32/48² = 4 of 9 (attention),
    # 32·64/(48·96) = 8 of 18 (MLP): 4·4 + 2·8 = 32 blocks, the dense block's 8192 weights
    assert float(stats.sparsity) == pytest.approx(1 - 32 * 256 / 18432, abs=1e-6)
    assert accounting.block_matmul_weights(model) == (stats.n_prunable, 0)
    losses = _train(model, steps=8)
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.slow
def test_bsr_layers_run():
    """The layer families on BSR kernels (``linear_factory`` of a bsr config), one model whose
    linears cycle through parallel, factorized, doped (one build instead of three): half the
    blocks of every sparse part kept, Doped's low-rank a dense Param, Factorized's rank a
    multiple of the block; forward and backward traced through the kernels."""
    factories = {f: build.linear_factory(_bsr_config(f)[0]) for f in LAYER_FAMILIES}
    order = iter(LAYER_FAMILIES * 2)  # query, key, value, out, fc_in, fc_out

    def linear(*args, **kwargs):
        return factories[next(order)](*args, **kwargs)

    model = GPT(_bsr_config("parallel")[1], rngs=nnx.Rngs(0), linear=linear)
    block = model.blocks[0]
    assert isinstance(block.attn.query, sparse_ift.SparseParallel)
    assert isinstance(block.mlp.fc_out, sparse_ift.SparseDoped)
    assert block.mlp.fc_in.u.sparse_kernel().shape == (32, 48)  # ceil(32·64/48) = 43 -> 48
    stats = accounting.structural_stats(model, _params(model))
    assert float(stats.sparsity) == pytest.approx(0.5, abs=1e-6)
    # dense: value (32x32, r = 8) and fc_out (64x32, r = floor(.5·2048/96) = 10) low-rank
    assert accounting.block_matmul_weights(model) == (stats.n_prunable, 8 * 64 + 10 * 96)
    x, y = _batch()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss, grads = jax.eval_shape(jax.value_and_grad(
        lambda p: loss_fn(nnx.merge(graphdef, p, rest), x, y)), params)
    assert loss.shape == ()
    assert jax.tree.map(lambda g: g.shape, grads) == jax.tree.map(lambda p: p.shape, params)
