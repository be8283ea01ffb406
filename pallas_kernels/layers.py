"""Flax NNX linear layers on the sparse kernels, plus factories for the model.

``BSRLinear`` / ``NMLinear`` compute ``y = x @ W (+ bias)`` with ``W`` stored compressed; the
trainable ``nnx.Param`` is the packed values only (kept blocks / kept N:M entries), so with
a static mask gradients reach the kept weights only. The sparsity metadata lives in
non-trainable ``nnx.Variable`` subclasses (``BlockLayout`` holds the static BSR layout, a
leaf-less pytree, so ``nnx.jit`` treats it as compile-time structure; ``NMCodes`` holds the
packed N:M position codes). Dense equivalent: ``nnx.Linear`` with ``kernel`` ``(in, out)``.

``dtype`` is the compute dtype: input, values and bias are cast to it and the kernels accumulate
in float32 and return it (mixed precision: float32 values, bfloat16 compute). ``None`` computes
in the wider of the input's and the values' dtypes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.block_sparse.format import BSRMatrix, check_block
from pallas_kernels.block_sparse.ops import bsr_matmul
from pallas_kernels.nm.format import NMMatrix, check_nm
from pallas_kernels.nm.ops import nm_matmul
from pallas_kernels.sharding import split_batch

_default_kernel_init = nnx.initializers.lecun_normal()


class BlockLayout(nnx.Variable):
    """Non-trainable: the static :class:`BSRLayout` (which blocks are stored)."""


class NMCodes(nnx.Variable):
    """Non-trainable: packed N:M in-group positions (integer metadata)."""


def _bias_param(bias, out_features: int, param_dtype) -> nnx.Param | None:
    if bias is None:
        return None
    b = jnp.asarray(bias, param_dtype)
    if b.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {b.shape}")
    return nnx.Param(b)


def _bsr_call(x: jax.Array, w: BSRMatrix, backend: str) -> jax.Array:
    """``bsr_matmul(x, w)``, on a context mesh per device on its batch rows
    (:func:`pallas_kernels.sharding.split_batch`)."""
    return split_batch(lambda x, v: bsr_matmul(x, BSRMatrix(v, w.layout), backend=backend),
                       x, w.values)


def _nm_call(x: jax.Array, w: NMMatrix, backend: str) -> jax.Array:
    """``nm_matmul(x, w)``, on a context mesh per device on its batch rows."""
    return split_batch(
        lambda x, v, c: nm_matmul(x, NMMatrix(v, c, w.shape, w.n, w.m), backend=backend),
        x, w.values, w.codes)


class BSRLinear(nnx.Module):
    """Block-sparse linear layer: the trainable Param ``values`` holds the kept blocks."""

    def __init__(self, w: BSRMatrix, bias=None, *, backend: str = "auto", dtype=None):
        self.in_features, self.out_features = w.shape
        self.block = w.block
        self.backend = backend
        self.dtype = dtype
        self.values = nnx.Param(w.values)
        self.layout = BlockLayout(w.layout)
        self.bias = _bias_param(bias, self.out_features, w.values.dtype)

    @classmethod
    def from_dense(
        cls, kernel, bias=None, *, block: tuple[int, int], block_mask=None, backend: str = "auto",
        dtype=None,
    ) -> BSRLinear:
        """From a dense ``(in, out)`` kernel. Without ``block_mask`` all-zero blocks are
        dropped (inference); with a boolean ``(in/bk, out/bn)`` mask exactly those blocks are
        kept as trainable values (static-mask training)."""
        if block_mask is None:
            w = BSRMatrix.from_dense(kernel, block=block)
        else:
            w = BSRMatrix.from_mask(kernel, block_mask, block=block)
        return cls(w, bias, backend=backend, dtype=dtype)

    def sparse_kernel(self) -> BSRMatrix:
        return BSRMatrix(self.values[...], self.layout.get_value())

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.sparse_kernel()
        dtype = self.dtype or jnp.result_type(x.dtype, w.values.dtype)
        w = BSRMatrix(w.values.astype(dtype), w.layout)
        y = _bsr_call(x.astype(dtype), w, self.backend)
        return y if self.bias is None else y + self.bias[...].astype(dtype)


class NMLinear(nnx.Module):
    """N:M sparse linear layer: the trainable Param ``values`` holds the kept entries."""

    def __init__(self, w: NMMatrix, bias=None, *, backend: str = "auto", dtype=None):
        self.in_features, self.out_features = w.shape
        self.n, self.m = w.n, w.m
        self.backend = backend
        self.dtype = dtype
        self.values = nnx.Param(w.values)
        self.codes = NMCodes(w.codes)
        self.bias = _bias_param(bias, self.out_features, w.values.dtype)

    @classmethod
    def from_dense(
        cls, kernel, bias=None, *, n: int, m: int, prune: bool = False, backend: str = "auto",
        dtype=None,
    ) -> NMLinear:
        """From a dense ``(in, out)`` kernel that is ``n:m`` sparse along ``in`` (or, with
        ``prune=True``, after magnitude N:M pruning)."""
        return cls(NMMatrix.from_dense(kernel, n, m, prune=prune), bias, backend=backend,
                   dtype=dtype)

    def sparse_kernel(self) -> NMMatrix:
        shape = (self.in_features, self.out_features)
        return NMMatrix(self.values[...], self.codes[...], shape, self.n, self.m)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.sparse_kernel()
        dtype = self.dtype or jnp.result_type(x.dtype, w.values.dtype)
        w = NMMatrix(w.values.astype(dtype), w.codes, w.shape, w.n, w.m)
        y = _nm_call(x.astype(dtype), w, self.backend)
        return y if self.bias is None else y + self.bias[...].astype(dtype)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init(kernel_init, key, shape, dtype):
    return kernel_init(key, shape, dtype)


MaskFn = Callable[[int, int, jax.Array], np.ndarray]


def random_block_mask(density: float, grid: tuple[int, int], key: jax.Array) -> np.ndarray:
    """Boolean block mask with ``round(density * blocks)`` blocks (at least one) kept."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    total = grid[0] * grid[1]
    keep = max(1, round(density * total))
    order = np.asarray(jax.random.permutation(key, total))
    mask = np.zeros(total, bool)
    mask[order[:keep]] = True
    return mask.reshape(grid)


def bsr_linear_factory(
    block: tuple[int, int],
    density_or_mask_fn: float | MaskFn = 1.0,
    *,
    backend: str = "auto",
    param_dtype=jnp.float32,
    kernel_init=_default_kernel_init,
    dtype=None,
) -> Callable[..., BSRLinear]:
    """Factory ``(in_features, out_features, *, use_bias, rngs[, init_scale][, dtype]) ->
    BSRLinear`` for the model.

    ``density_or_mask_fn``: a float (a random static block mask keeping that fraction of
    blocks) or ``fn(in_blocks, out_blocks, key) -> bool mask``. The kernel is initialised as
    ``nnx.Linear``'s (LeCun normal) and only the kept blocks are stored. Construct eagerly
    (the mask is host data). ``dtype``: the compute dtype (the model hands its own to the
    factory, which overrides this default).
    """
    default_dtype = dtype

    def factory(
        in_features: int, out_features: int, *, use_bias: bool, rngs: nnx.Rngs,
        init_scale: float = 1.0, dtype=default_dtype,
    ) -> BSRLinear:
        bk, bn = check_block((in_features, out_features), block)
        grid = (in_features // bk, out_features // bn)
        kernel = _init(kernel_init, rngs.params(), (in_features, out_features), param_dtype)
        kernel = kernel if init_scale == 1.0 else (kernel * init_scale).astype(param_dtype)
        if callable(density_or_mask_fn):
            mask = np.asarray(density_or_mask_fn(grid[0], grid[1], rngs.params()), bool)
        else:
            mask = random_block_mask(float(density_or_mask_fn), grid, rngs.params())
        bias = jnp.zeros((out_features,), param_dtype) if use_bias else None
        return BSRLinear.from_dense(kernel, bias, block=(bk, bn), block_mask=mask, backend=backend,
                                    dtype=dtype)

    return factory


def nm_linear_factory(
    n: int,
    m: int,
    *,
    backend: str = "auto",
    param_dtype=jnp.float32,
    kernel_init=_default_kernel_init,
    dtype=None,
) -> Callable[..., NMLinear]:
    """Factory ``(in_features, out_features, *, use_bias, rngs[, init_scale][, dtype]) ->
    NMLinear``: LeCun-normal init, then magnitude ``n:m`` pruning along ``in_features`` (a
    static N:M mask); ``dtype`` as in :func:`bsr_linear_factory`."""
    default_dtype = dtype

    def factory(in_features: int, out_features: int, *, use_bias: bool, rngs: nnx.Rngs,
                init_scale: float = 1.0, dtype=default_dtype) -> NMLinear:
        check_nm((in_features, out_features), n, m)
        kernel = _init(kernel_init, rngs.params(), (in_features, out_features), param_dtype)
        kernel = kernel if init_scale == 1.0 else (kernel * init_scale).astype(param_dtype)
        bias = jnp.zeros((out_features,), param_dtype) if use_bias else None
        return NMLinear.from_dense(kernel, bias, n=n, m=m, prune=True, backend=backend,
                                   dtype=dtype)

    return factory
