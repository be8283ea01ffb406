"""N:M compressed storage for a ``(K, N)`` kernel used as ``y = x @ W``.

N:M sparsity (Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021; Zhou et al.,
"Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch", ICLR 2021): in
every group of ``m`` consecutive entries along the contraction axis K (axis 0) of each
column, at most ``n`` are non-zero.

Layout (chosen so a kernel decompresses a tile with shifts, compares and selects only):

* ``values``: ``(K*n/m, N)``, **plane-major**: row ``t*G + g`` holds the ``t``-th kept entry
  (in increasing K order) of group ``g`` (``G = K/m`` groups).
* ``codes``: the ``n`` in-group positions of a group, ``b = ceil(log2 m)`` bits each, form an
  ``n*b``-bit code; ``P`` codes share one unsigned container (uint8/16/32), planar over
  groups: group ``g`` sits in container row ``g % R`` at slot ``g // R`` (``R = G/P``).

For 2:4 that is 4 bits per group, two groups per byte: 1/16 of the dense bf16 bytes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_CONTAINERS = ((8, np.uint8), (16, np.uint16), (32, np.uint32))


def check_nm(shape: tuple[int, ...], n: int, m: int) -> None:
    """Validate ``n``, ``m`` against a 2-D ``(K, N)`` shape; ``ValueError`` otherwise."""
    if len(shape) != 2:
        raise ValueError(f"w must be 2-D (K, N), got shape {tuple(shape)}")
    if not (isinstance(m, int) and m >= 2):
        raise ValueError(f"m must be an int >= 2, got {m!r}")
    if not (isinstance(n, int) and 1 <= n <= m):
        raise ValueError(f"n must be an int with 1 <= n <= m = {m}, got {n!r}")
    if shape[0] % m:
        raise ValueError(f"m = {m} must divide K = shape[0] = {shape[0]} (N:M runs along K)")


def code_layout(groups: int, n: int, m: int) -> tuple[int, int, type]:
    """``(bits per index b, groups per container P, container dtype)`` for ``groups`` groups."""
    b = max(1, math.ceil(math.log2(m)))
    for width, dtype in _CONTAINERS:
        if n * b <= width:
            p = width // (n * b)
            while groups % p:
                p -= 1
            return b, p, dtype
    raise ValueError(f"n * ceil(log2 m) = {n * b} bits exceeds 32; use a smaller n:m")


@jax.tree_util.register_pytree_node_class
class NMMatrix:
    """Compressed N:M matrix: leaves ``values`` and ``codes``; static ``shape, n, m``."""

    def __init__(self, values: jax.Array, codes: jax.Array, shape: tuple[int, int], n: int, m: int):
        self.values, self.codes = values, codes
        self.shape, self.n, self.m = (int(shape[0]), int(shape[1])), int(n), int(m)

    def tree_flatten(self):
        return (self.values, self.codes), (self.shape, self.n, self.m)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], children[1], *aux)

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def groups(self) -> int:
        return self.shape[0] // self.m

    @property
    def bits(self) -> int:
        return code_layout(self.groups, self.n, self.m)[0]

    @property
    def per_container(self) -> int:
        return code_layout(self.groups, self.n, self.m)[1]

    @classmethod
    def from_dense(cls, w, n: int, m: int, *, prune: bool = False) -> NMMatrix:
        """Compress a dense ``(K, N)`` array that is ``n:m`` sparse along axis 0.

        With ``prune=True`` the ``n`` largest-magnitude entries of each group are kept
        (magnitude N:M pruning); otherwise a group with more than ``n`` non-zeros raises.
        """
        w_np = np.asarray(w)
        check_nm(w_np.shape, n, m)
        k, cols = w_np.shape
        g = k // m
        grouped = w_np.reshape(g, m, cols)
        if not prune:
            worst = int((grouped != 0).sum(axis=1).max(initial=0))
            if worst > n:
                raise ValueError(
                    f"w is not {n}:{m} sparse along K: a group of {m} has {worst} non-zeros; "
                    "prune it N:M first (or pass prune=True)"
                )
        mag = np.abs(grouped.astype(np.float32))
        order = np.argsort(-mag, axis=1, kind="stable")[:, :n, :]  # (g, n, cols)
        idx = np.sort(order, axis=1)
        vals = np.take_along_axis(grouped, idx, axis=1)  # (g, n, cols)
        b, p, dtype = code_layout(g, n, m)
        code = np.zeros((g, cols), np.uint64)
        for t in range(n):
            code |= idx[:, t, :].astype(np.uint64) << np.uint64(t * b)
        r = g // p
        packed = np.zeros((r, cols), np.uint64)
        for s in range(p):
            packed |= code[s * r : (s + 1) * r] << np.uint64(s * n * b)
        values = vals.transpose(1, 0, 2).reshape(n * g, cols)
        return cls(jnp.asarray(values), jnp.asarray(packed.astype(dtype)), (k, cols), n, m)

    def indices(self) -> jax.Array:
        """In-group positions of the kept entries, ``(n, G, N)`` int32 (plane-major)."""
        return unpack_indices(self.codes, self.n, self.m, self.groups)

    def to_dense(self) -> jax.Array:
        """Scatter the kept values back into a dense ``(K, N)`` array."""
        return _to_dense(self.values, self.codes, self.shape, self.n, self.m)

    def nbytes(self) -> int:
        """Compressed bytes: values plus packed codes."""
        return int(
            self.values.size * self.values.dtype.itemsize
            + self.codes.size * self.codes.dtype.itemsize
        )

    def dense_nbytes(self) -> int:
        return int(self.shape[0] * self.shape[1] * self.values.dtype.itemsize)

    def __repr__(self) -> str:
        return (
            f"NMMatrix(shape={self.shape}, n:m={self.n}:{self.m}, dtype={self.dtype}, "
            f"bytes={self.nbytes()}/{self.dense_nbytes()} dense)"
        )


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _to_dense(values, codes, shape: tuple[int, int], n: int, m: int) -> jax.Array:
    g, cols = shape[0] // m, shape[1]
    idx = unpack_indices(codes, n, m, g)  # (n, g, cols)
    vals = values.reshape(n, g, cols)
    rows = jnp.arange(g)[None, :, None] * m + idx
    colix = jnp.broadcast_to(jnp.arange(cols)[None, None, :], idx.shape)
    dense = jnp.zeros(shape, values.dtype)
    return dense.at[rows.reshape(-1), colix.reshape(-1)].add(vals.reshape(-1))


def unpack_indices(codes: jax.Array, n: int, m: int, groups: int) -> jax.Array:
    """Unpack ``codes`` to ``(n, groups, N)`` int32 in-group positions."""
    b, p, _ = code_layout(groups, n, m)
    c = codes.astype(jnp.uint32)
    per_group = jnp.concatenate([(c >> (s * n * b)) for s in range(p)], axis=0)  # (G, N)
    mask = (1 << b) - 1
    return jnp.stack([((per_group >> (t * b)) & mask).astype(jnp.int32) for t in range(n)])
