"""Bit-packed masks in the optimizer state (``sparsify(..., packed_masks=True)``, issue 27.5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from sparsejax import methods, packing, schedules

MATRIX = lambda path, leaf: jnp.ndim(leaf) >= 2  # noqa: E731 - prunable: the 2-D leaves


def test_pack_hand_worked_and_round_trip():
    row = [1, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1]
    mask = np.array([row, row[::-1]], bool)
    # little bit order: entry 8k + j is bit j of byte k
    # row: bits 0, 2, 3 -> 1 + 4 + 8 = 13; bits 0, 1, 7 -> 1 + 2 + 128 = 131
    # reversed: bits 0, 6, 7 -> 1 + 64 + 128 = 193; bits 4, 5, 7 -> 16 + 32 + 128 = 176
    bits = packing.pack(mask)
    assert bits.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(bits), [[13, 131], [193, 176]])
    np.testing.assert_array_equal(np.asarray(packing.unpack(bits)), mask)
    rng = np.random.default_rng(0)
    for shape in [(8,), (3, 16), (2, 3, 24)]:
        m = rng.random(shape) < 0.3
        np.testing.assert_array_equal(np.asarray(packing.unpack(packing.pack(m))), m)
    tree = {"k": jnp.asarray(mask), "odd": jnp.ones((4, 6), bool), "b": jnp.bool_(True)}
    packed = packing.pack_tree(tree)
    assert packed["k"].shape == (2, 2) and packed["k"].dtype == jnp.uint8
    assert packed["odd"].dtype == jnp.bool_ and packed["b"].shape == ()  # stay bool
    back = packing.bool_masks(packed)
    for k in tree:
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(tree[k]))
    # int32 0/1 (what optax.contrib.sam's arithmetic makes of bool masks) reads as bool
    widened = packing.bool_masks({"k": jnp.asarray(mask, jnp.int32)})["k"]
    assert widened.dtype == jnp.bool_ and (np.asarray(widened) == mask).all()
    assert packing.mask_bytes(packed) == 2 * 2 + 4 * 6 + 1


def _params():
    rng = np.random.default_rng(1)
    return {"d1": {"kernel": jnp.asarray(rng.normal(size=(12, 16)), jnp.float32),
                   "bias": jnp.zeros(16)},
            "d2": {"kernel": jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)}}  # 6: bool


def _loss(p, x):
    return jnp.mean((jnp.tanh(x @ p["d1"]["kernel"] + p["d1"]["bias"]) @ p["d2"]["kernel"]) ** 2)


def _trace(method, packed, steps):
    tx = sparsejax.sparsify(optax.adam(0.05), method, prunable=MATRIX, packed_masks=packed)
    params = _params()
    state = tx.init(params)
    params = sparsejax.prune(params, state)

    @jax.jit
    def step(p, s, x):
        u, s = tx.update(jax.grad(_loss)(p, x), s, p)
        return optax.apply_updates(p, u), s

    out = []
    for t in range(steps):
        x = jax.random.normal(jax.random.PRNGKey(t), (8, 12))
        params, state = step(params, state, x)
        out.append((jax.device_get(params), jax.device_get(sparsejax.masks_of(state))))
    return out, state


@pytest.mark.parametrize("method", [
    methods.gradual(schedules.polynomial(0.75, 0, 4, update_every=1), score="magnitude"),
    pytest.param(methods.rigl(0.5, update_every=2, end_step=6, allocation="uniform"),
                 marks=pytest.mark.slow),  # ~4 s: the fast tier keeps the gradual case
], ids=["gradual", "rigl"])
def test_packed_masks_bit_equal_to_unpacked(method):
    steps = 6
    plain, _ = _trace(method, False, steps)
    packed, state = _trace(method, True, steps)
    stored = sparsejax.find_state(state)  # readers unpack ...
    assert stored.masks["d1"]["kernel"].dtype == jnp.bool_
    raw = state.masks  # ... the state holds 16 -> 2 bytes per row of d1, d2 (last axis 6) bool
    assert raw["d1"]["kernel"].shape == (12, 2) and raw["d1"]["kernel"].dtype == jnp.uint8
    assert raw["d2"]["kernel"].dtype == jnp.bool_
    changed = False
    for t, ((p0, m0), (p1, m1)) in enumerate(zip(plain, packed, strict=True)):
        for a, b in zip(jax.tree_util.tree_leaves((p0, m0)), jax.tree_util.tree_leaves((p1, m1)),
                        strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"step {t}")
        for layer in ("d1", "d2"):
            assert (p1[layer]["kernel"][~m1[layer]["kernel"]] == 0).all()
        changed |= t > 0 and not (m1["d1"]["kernel"] == packed[t - 1][1]["d1"]["kernel"]).all()
    assert changed  # the masks moved during the run


def test_config_key_packs_the_run_masks_and_loaders_unpack_them():
    """sparsity.packed_masks=True builds sparsify(..., packed_masks=True); the run framework's
    mask reader (checkpoint.find_masks, behind sparsejax.load) gives bool masks back."""
    from conftest import tiny_config

    from sparsejax.run import build, checkpoint, configlib

    spec = configlib.validate(tiny_config(sparsity__method="static", sparsity__final=0.5,
                                          sparsity__score="magnitude",
                                          sparsity__allocation="uniform",
                                          sparsity__packed_masks=True))
    assert spec.sparsity.packed_masks is True
    tx, _ = build.optimizer(spec, methods.static(0.5, score="magnitude", allocation="uniform"))
    params = _params()
    state = tx.init(params)
    assert state.masks["d1"]["kernel"].dtype == jnp.uint8
    raw = jax.tree_util.tree_map(np.asarray, state._asdict())  # a raw (dict) restore
    found = checkpoint.find_masks({"opt_state": raw})
    np.testing.assert_array_equal(np.asarray(found["d1"]["kernel"]),
                                  np.asarray(sparsejax.masks_of(state)["d1"]["kernel"]))
    assert found["d1"]["kernel"].dtype == jnp.bool_ and found["d1"]["kernel"].shape == (12, 16)
    # run dirs written before the key existed ran unpacked: they still resume
    old = configlib.base().to_dict()
    del old["sparsity"]["packed_masks"]
    assert "sparsity.packed_masks" not in configlib.differing_keys(old, configlib.base().to_dict())
