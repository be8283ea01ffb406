"""Accounting: parameter counts, FLOPs per token (SPDF's GPT-3 XL figure), N_avg."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax
from sparsejax import methods, schedules
from sparsejax.models import GPT, GPTConfig
from sparsejax.run.accounting import (
    ParamCounts,
    count_params,
    flops_per_token,
    model_flops_per_token,
    n_avg_of,
    n_avg_update,
    train_flops_per_token,
)


def _toy_params():
    return {
        "blocks": {"attn": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}},
        "embed": {"embedding": jnp.ones((5, 2))},
        "final_norm": {"scale": jnp.ones(2)},
    }


def _toy_masks():
    kernel = np.ones((4, 3), bool)
    kernel.flat[[0, 2, 5, 7, 11]] = False  # 5 pruned entries
    return {
        "blocks": {"attn": {"kernel": kernel, "bias": True}},
        "embed": {"embedding": True},
        "final_norm": {"scale": True},
    }


def test_count_params_by_hand():
    params = _toy_params()
    assert count_params(params) == ParamCounts(total=27, prunable=12, active=27)
    assert count_params(params, _toy_masks()) == ParamCounts(27, 12, 22)
    assert count_params(params, _toy_masks(), exclude_embeddings=True) == (17, 12, 12)
    only_bias = lambda path, leaf: "bias" in str(path)  # noqa: E731
    assert count_params(params, prunable=only_bias).prunable == 3


def test_count_params_under_jit_and_errors():
    params, masks = _toy_params(), _toy_masks()
    active = jax.jit(lambda p, m: count_params(p, m).active)(params, masks)
    assert int(active) == 22
    with pytest.raises(ValueError, match="structure"):
        count_params(params, {"blocks": True})
    bad = _toy_masks()
    bad["blocks"]["attn"]["kernel"] = np.ones((3, 4), bool)
    with pytest.raises(ValueError, match="mask shape"):
        count_params(params, bad)


@pytest.mark.parametrize("pos, tie", [("rope", True), ("learned", False)])
def test_count_params_of_gpt_matches_formula(pos, tie):
    cfg = GPTConfig(
        n_layer=3,
        d_model=16,
        n_head=2,
        d_ff=40,
        vocab_size=50,
        n_ctx=12,
        pos=pos,
        tie_embeddings=tie,
    )
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    L, d, ff, V, T = 3, 16, 40, 50, 12
    per_layer = 4 * (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * (2 * d)
    embeddings = V * d + (T * d if pos == "learned" else 0) + (0 if tie else d * V)
    counts = count_params(nnx.state(model, nnx.Param))
    assert counts.total == L * per_layer + 2 * d + embeddings
    assert counts.prunable == L * (4 * d * d + 2 * d * ff)
    non_embed = count_params(nnx.state(model, nnx.Param), exclude_embeddings=True)
    assert non_embed.total == L * per_layer + 2 * d


def test_flops_hand_computed_tiny():
    # L=1, d=2, ff=4, n_ctx=3, V=5: weights 2·1·(4·4 + 2·2·4) = 64, attention 4·1·3·2 = 24,
    # head 2·2·5 = 20.
    assert flops_per_token(1, 2, 4, 3, 5) == 108.0
    assert flops_per_token(1, 2, 4, 3, 5, sparsity=0.5) == 32.0 + 24.0 + 20.0
    assert train_flops_per_token(1, 2, 4, 3, 5, sparsity=0.5) == 3 * 76.0
    assert flops_per_token(1, 2, 4, 3, 5, sparsity=1.0) == 44.0


def test_spdf_gpt3_xl_reduction():
    """SPDF (Thangarasa et al., 2023): GPT-3 XL at 75% sparsity needs 2.49x fewer FLOPs."""
    xl = dict(n_layer=24, d_model=2048, d_ff=8192, n_ctx=2048, vocab=50257)
    ratio = train_flops_per_token(**xl) / train_flops_per_token(**xl, sparsity=0.75)
    assert round(ratio, 2) == 2.49
    # By hand: 48·(16,777,216 + 33,554,432) = 2,415,919,104 weights; 4·24·2048·2048 =
    # 402,653,184 attention; 2·2048·50257 = 205,852,672 head.
    assert flops_per_token(**xl) == 2_415_919_104 + 402_653_184 + 205_852_672
    assert flops_per_token(**xl, sparsity=0.75) == 603_979_776 + 402_653_184 + 205_852_672


def test_model_flops_per_token():
    cfg = GPTConfig.from_variant("tiny", n_ctx=128)
    want = flops_per_token(2, 64, 256, 128, 256, 0.5)
    assert model_flops_per_token(cfg, 0.5) == want
    assert model_flops_per_token(cfg, 0.5, train=True) == 3 * want
    assert model_flops_per_token(cfg, n_ctx=64) == flops_per_token(2, 64, 256, 64, 256)


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(n_layer=0), "n_layer"),
        (dict(d_model=2.0), "d_model"),
        (dict(vocab=-3), "vocab"),
        (dict(sparsity=1.5), "sparsity"),
        (dict(sparsity=-0.1), "sparsity"),
    ],
)
def test_flops_errors(kw, name):
    args = {**dict(n_layer=1, d_model=2, d_ff=4, n_ctx=3, vocab=5), **kw}
    with pytest.raises(ValueError, match=name):
        flops_per_token(**args)


def test_n_avg():
    # Dense for 2 steps, then half the 100 parameters pruned for 2 steps: N_avg = 75.
    seq = [100.0, 100.0, 50.0, 50.0]
    assert n_avg_of(seq) == 75.0
    running = 0.0
    for step, n in enumerate(seq):
        running = n_avg_update(running, n, step)
    assert running == 75.0
    rng = np.random.default_rng(0)
    seq = rng.uniform(1e6, 2e6, size=257)
    running = 123.0  # ignored at step 0
    for step, n in enumerate(seq):
        running = n_avg_update(running, n, step)
    np.testing.assert_allclose(running, np.mean(seq.astype(np.float64)), rtol=1e-12)
    np.testing.assert_allclose(n_avg_of(seq), np.mean(seq), rtol=1e-12)
    jitted = jax.jit(n_avg_update)(jnp.float32(10.0), jnp.float32(20.0), jnp.int32(1))
    assert float(jitted) == 15.0
    with pytest.raises(ValueError, match="at least one"):
        n_avg_of([])
    with pytest.raises(ValueError, match="step"):
        n_avg_update(1.0, 1.0, -1)


def test_non_embedding_count_matches_whole_components():
    import numpy as np

    params = {"wte": np.zeros((10, 4)), "pos_embed": np.zeros((8, 4)),
              "posterior_head": {"kernel": np.zeros((4, 3))},
              "time_embed_mlp": {"kernel": np.zeros((4, 4))}, "unembed": np.zeros((4, 10))}
    # only the token/position tables and the unembed head are embeddings; a diffusion model's
    # "time_embed_mlp" layer merely contains the letters
    assert count_params(params, exclude_embeddings=True).total == 12 + 16


def test_flops_coefficients_are_three_forwards_by_hand():
    """``step.flops_coefficients`` (what the training loop accumulates per token): training =
    3 x forward, read off a built GPT. L=2, d=8, ff=24, V=11 at seq_len 5: forward fixed part
    4·L·T·d + 2·d·V = 320 + 176 = 496 (attention scores, LM head), maskable part
    2·L·(4d² + 2d·ff) = 4·(256 + 384) = 2560 (the block weights, scaled by density)."""
    from sparsejax.run.step import flops_coefficients

    cfg = GPTConfig(n_layer=2, d_model=8, n_head=2, d_ff=24, vocab_size=11, n_ctx=16)
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    assert flops_coefficients(model, 5) == (3 * 496.0, 3 * 2560.0)


def test_train_step_accumulates_n_avg_and_flops_by_hand():
    """``make_train_step`` on a hand-built model (one 4x2 Dense layer: 8 prunable weights and
    2 biases) pruned by an iterative schedule to 50% at step 1 and 75% at step 2: the counts
    after each step's update are 10, 6 and 4 active parameters (densities 1, 1/2, 1/4), so
    N_avg after 1, 2, 3 steps is 10, 8, 20/3, and the FLOPs add tokens_per_step · (fixed +
    dense · density) per step: 7·1100, then + 7·600, then + 7·350."""
    from sparsejax.run.step import TrainState, make_train_step

    model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params_state)
    sched = schedules.iterative([0.5, 0.75], [1, 2])
    tx = sparsejax.sparsify(optax.sgd(0.1),
                            methods.gradual(sched, score="magnitude", allocation="uniform"))
    zero = lambda: jnp.zeros((), jnp.float32)  # noqa: E731 - one buffer each (donated)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0), n_avg=zero(), flops=zero(), loss_sum=zero(),
                       loss_count=jnp.zeros((), jnp.int32))
    step = make_train_step(
        graphdef, jax.tree_util.tree_structure(params_state), rest, tx, fixed_flops=100.0,
        dense_flops=1000.0, tokens_per_step=7.0, sparse=True, structural=None,
        loss=lambda m, x, y, aux: jnp.mean((m(x) - y) ** 2))
    x, y = jnp.ones((3, 4)), jnp.zeros((3, 2))
    seen = []
    for _ in range(3):
        state, metrics = step(state, x, y)
        seen.append((float(metrics["n_active"]), float(metrics["density"]),
                     float(state.n_avg), float(state.flops)))
    want = [(10.0, 1.0, 10.0, 7700.0), (6.0, 0.5, 8.0, 11900.0), (4.0, 0.25, 20 / 3, 14350.0)]
    np.testing.assert_allclose(seen, want, rtol=1e-6)
    assert int(state.step) == 3 and int(state.loss_count) == 3
