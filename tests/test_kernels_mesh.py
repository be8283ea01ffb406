"""The sparse kernel layers under a context mesh (:mod:`pallas_kernels.sharding`): traced only,
in this one-device process, with an abstract mesh in context. The compiled HLO on 8 simulated
devices is checked in ``tests/test_scale_out.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from pallas_kernels.layers import bsr_linear_factory, nm_linear_factory
from pallas_kernels.sharding import batch_axes, split_batch

FACTORIES = {"bsr": bsr_linear_factory((16, 16), 0.5), "nm": nm_linear_factory(2, 4)}


def _jaxpr(layer, x) -> str:
    return str(jax.make_jaxpr(lambda x: layer(x))(x))


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_without_a_mesh_or_on_one_device_the_call_is_the_plain_kernel(kind):
    layer = FACTORIES[kind](64, 32, use_bias=False, rngs=nnx.Rngs(0))
    x = jnp.ones((8, 4, 64))
    assert batch_axes() == ()
    assert "shard_map" not in _jaxpr(layer, x)
    with jax.sharding.use_abstract_mesh(AbstractMesh((1, 1), ("data", "fsdp"))):
        assert batch_axes() == ()
        assert "shard_map" not in _jaxpr(layer, x)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_on_a_mesh_each_device_gets_its_batch_rows(kind):
    """(2, 4) mesh: the kernel runs inside a shard_map over both axes on 8 / 8 = 1 of the 8
    sequences; the weights enter whole (replicated)."""
    layer = FACTORIES[kind](64, 32, use_bias=False, rngs=nnx.Rngs(0))
    x = jnp.ones((8, 4, 64))
    with jax.sharding.use_abstract_mesh(AbstractMesh((2, 4), ("data", "fsdp"))):
        assert batch_axes() == ("data", "fsdp")
        text = _jaxpr(layer, x)
        y = jax.eval_shape(layer, x)
    assert y.shape == (8, 4, 32)
    assert text.count("shard_map") == 1
    assert "in_specs=(P(('data', 'fsdp'),), P()" in text  # x split, weights replicated
    assert "f32[1,4,64]" in text  # one sequence per device inside


def test_a_batch_that_does_not_split_over_the_mesh_is_refused():
    with jax.sharding.use_abstract_mesh(AbstractMesh((2, 4), ("data", "fsdp"))):
        with pytest.raises(ValueError, match=r"mesh's 8 devices .* x has shape \(6, 64\)"):
            jax.eval_shape(lambda x: split_batch(lambda x: x, x), jnp.ones((6, 64)))
