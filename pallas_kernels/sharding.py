"""The sparse kernels under a device mesh: each device multiplies only its own batch rows.

A Pallas call (and, on CPU, the native kernels' FFI custom call) is opaque to XLA's SPMD
partitioner: it cannot split the op, so under ``jit`` on a mesh it replicates the operands,
all-gathering the batch and computing the whole layer on every device. :func:`split_batch`
runs the kernel inside ``jax.shard_map`` instead, with the leading (batch) dim of ``x`` split
over the mesh that JAX has in context (``jax.set_mesh``; read here with
``jax.sharding.get_abstract_mesh()``) and the weights replicated: every device gets the whole
packed weight (the partitioner all-gathers FSDP-sharded values right before the layer, as
ZeRO-3 does) and computes ``x_shard @ W`` for its rows only. The weights' cotangent is summed
over the devices by ``shard_map``'s transpose and goes back to the weights' own sharding. The
kernels need the whole weight per device: any row block of ``x`` meets every stored block of
``W``.

Without a context mesh, or with one of a single device, the call is the plain kernel call.
Imports nothing of sparsejax: the mesh comes from JAX's context.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P


def batch_axes() -> tuple[str, ...]:
    """The axes of the context mesh the batch is split over: every axis not already manual
    (inside an enclosing ``shard_map``); ``()`` without a mesh or on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
    return axes if math.prod(mesh.shape[a] for a in axes) > 1 else ()


def split_batch(fn: Callable[..., jax.Array], x: jax.Array, *weights: jax.Array) -> jax.Array:
    """``fn(x, *weights)``, with ``x``'s leading dim split over the context mesh's devices
    (:func:`batch_axes`) and ``weights`` replicated; the result is split like ``x``.

    ``fn`` must act on batch rows independently (a matmul ``x @ W``). ``ValueError`` when the
    leading dim does not split over the devices (no silent replicated fallback).
    """
    axes = batch_axes()
    if not axes:
        return fn(x, *weights)
    mesh = jax.sharding.get_abstract_mesh()
    n = math.prod(mesh.shape[a] for a in axes)
    if x.ndim < 2 or x.shape[0] % n:
        raise ValueError(f"the sparse kernel splits x's leading (batch) dim over the mesh's {n} "
                         f"devices (axes {axes}); x has shape {x.shape}")
    spec = P(axes)
    # check_vma=False: the kernels' custom_vjp and FFI calls carry no varying-axes types. The
    # transpose then sums the replicated weights' cotangents over the devices (a psum), as
    # the gradient needs (tests/test_scale_out.py compares with one device).
    mapped = jax.shard_map(fn, in_specs=(spec, *(P() for _ in weights)), out_specs=spec,
                           check_vma=False)
    return mapped(x, *weights)
