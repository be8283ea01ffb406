"""Running the decoder blocks: a Python loop, rematerialised per block, or scanned over depth.

* ``remat`` (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): each block runs
  under ``jax.checkpoint`` with a policy from ``jax.checkpoint_policies``: ``full`` saves only
  the block's input and recomputes the rest in the backward pass; ``dots_saveable`` and
  ``dots_with_no_batch_dims_saveable`` also save matmul outputs (JAX's policies of those names,
  plus every block linear's output, named :data:`sparsejax.models.layers.LINEAR_OUT`: the linear
  layers' matmuls are ``custom_vjp`` functions, which JAX's dot policies cannot see).
* ``scan``: one ``jax.lax.scan`` over the blocks, so the program holds one block whatever the
  depth (compile time does not grow with ``n_layer``). The params tree is *not* stacked: the
  model keeps ``blocks/<i>/...`` (prunable leaves, contraction axes, masks, checkpoints, export
  and the FLOP accounting are unchanged); the blocks' weights are stacked when the model runs,
  weight matrices (floating, ``ndim >= 2``) cast to the compute dtype first, which every layer
  does before its matmul anyway: in bfloat16 the stack is the cast copy the layers would make;
  in float32 it is one extra copy of the block weights (and of their gradients, unstacked after
  the scan). Scanning needs blocks of one structure: BSR layers, whose static block layout
  differs per layer, cannot be scanned.

Non-parameter variables a block writes while it runs (e.g. :mod:`sparsejax.calibration`'s
activation statistics) are carried through both transforms and written back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models.layers import LINEAR_OUT
from sparsejax.models.options import REMAT


def remat_policy(name: str) -> Callable[..., bool] | None:
    """The ``jax.checkpoint`` policy of a :data:`REMAT` name (``None`` for ``"none"``)."""
    cp = jax.checkpoint_policies
    if name == "none":
        return None
    if name == "full":
        return cp.nothing_saveable
    if name in ("dots_saveable", "dots_with_no_batch_dims_saveable"):
        return cp.save_from_both_policies(getattr(cp, name), cp.save_only_these_names(LINEAR_OUT))
    raise ValueError(f"remat must be one of {REMAT}, got {name!r}")


def _functional(graphdef: nnx.GraphDef) -> Callable[..., tuple[jax.Array, nnx.State]]:
    """``(params, rest, x) -> (block(x), written)``: the block as a pure function; ``written``
    holds the non-parameter variables it assigned (found while tracing: an unwritten variable
    still holds the very array it was given), so only those are written back."""

    def run(params: nnx.State, rest: nnx.State, x: jax.Array):
        given = {path: v.get_value() for path, v in nnx.to_flat_state(rest)}
        block = nnx.merge(graphdef, params, rest)
        y = block(x)
        after = nnx.to_flat_state(nnx.split(block, nnx.Param, ...)[2])
        return y, nnx.from_flat_state([(path, v) for path, v in after
                                       if v.get_value() is not given.get(path)])

    return run


def _to_compute(params: nnx.State, dtype: Any) -> nnx.State:
    def cast(a):
        floating = jnp.issubdtype(a.dtype, jnp.floating)
        return a.astype(dtype) if floating and a.ndim >= 2 else a

    return jax.tree.map(cast, params)


def apply_blocks(blocks: Sequence[nnx.Module], x: jax.Array, *, remat: str = "none",
                 scan: bool = False, dtype: Any = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """``(x_L, (x_1, ..., x_L))``: the blocks applied in order to ``x`` and every block's output,
    by a loop, under ``remat`` (:data:`REMAT`) and/or as one ``scan`` (module docstring)."""
    policy = remat_policy(remat)
    if not scan and policy is None:
        hidden = []
        for block in blocks:
            x = block(x)
            hidden.append(x)
        return x, tuple(hidden)
    if not scan:
        hidden = []
        for block in blocks:
            graphdef, params, rest = nnx.split(block, nnx.Param, ...)
            x, written = jax.checkpoint(_functional(graphdef), policy=policy)(params, rest, x)
            nnx.update(block, written)
            hidden.append(x)
        return x, tuple(hidden)
    splits = [nnx.split(block, nnx.Param, ...) for block in blocks]
    graphdef = splits[0][0]
    structures = {jax.tree.structure((p, r)) for _, p, r in splits}
    if any(g != graphdef for g, _, _ in splits) or len(structures) > 1:
        raise ValueError("scan needs blocks of one structure (BSR layers hold a different "
                         "static block layout per layer); build the model with scan=False")
    cast = (lambda p: p) if dtype is None else (lambda p: _to_compute(p, dtype))
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *(cast(p) for _, p, _ in splits))
    rest = jax.tree.map(lambda *xs: jnp.stack(xs), *(r for _, _, r in splits))
    run = _functional(graphdef)
    if policy is not None:
        run = jax.checkpoint(run, policy=policy, prevent_cse=False)  # scan already separates

    def body(x, layer):
        y, written = run(*layer, x)
        return y, (y, written)

    x, (hidden_N, written) = jax.lax.scan(body, x, (params, rest))
    for i, block in enumerate(blocks):
        nnx.update(block, jax.tree.map(lambda a, i=i: a[i], written))
    return x, tuple(hidden_N[i] for i in range(len(blocks)))
