"""Pallas kernels for N:M sparse ``x @ W`` that decompress ``W`` tile by tile in the kernel.

Only the compressed values (``n/m`` of the dense bytes) and the packed position codes are
read from memory; each ``(m*Gt, bn)`` weight tile is rebuilt in registers/VMEM with shifts,
compares and selects, as ``m`` planes (plane ``r`` = entries at in-group position ``r``),
and multiplied with the matching plane of ``x`` (``x`` is viewed with its K axis split as
``(m, G)``, so plane ``r`` of a tile is a contiguous column slice). Method: Mishra et al.,
"Accelerating Sparse Deep Neural Networks" (2021), storage as in ``format.py``.

Two flavours: ``nm_matmul_blocked`` (TPU style: K is the last, "arbitrary" grid axis with a
VMEM accumulator; every operand tile arrives through a BlockSpec, so ``x`` comes plane-split,
``(M, m*G)``, rewritten once per call by the caller) and ``nm_matmul_gpu`` (Triton style:
each program owns an output tile and loops over K, reading the planes of ``x`` in place
with strided loads).

Scope, honestly: neither Pallas Triton nor Mosaic GPU/TPU exposes the sparse tensor-core
MMA (``mma.sp``), so after decompression the arithmetic is dense: ``2 M K N`` FLOPs, no
fewer than a dense GEMM. The kernel saves *memory traffic* only (weights read at
``n/m`` of their bytes plus 1/16 for codes at 2:4), so it can beat dense only where the
matmul is memory-bound: small ``M`` (decode, small batches) and exported inference weights.
``nm_matmul(backend="auto")`` applies that rule (``ops.kernel_wins``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class NMTiles:
    """Tile sizes: rows ``bm``, output columns ``bn``, groups per K tile ``groups``."""

    bm: int = 128
    bn: int = 128
    groups: int = 128
    num_warps: int = 4
    num_stages: int = 3


def _tile_dot(xs, vs, code, *, n: int, m: int, bits: int):
    """Sum over planes r of ``xs[r] @ W_r``; ``W_r`` rebuilt from ``vs`` and ``code``."""
    mask = (1 << bits) - 1
    idx = [(code >> (t * bits)) & mask for t in range(n)]
    acc = None
    for r in range(m):
        w_r = jnp.zeros_like(vs[0])
        for t in range(n):
            w_r = jnp.where(idx[t] == r, vs[t], w_r)
        part = jnp.dot(xs[r], w_r, preferred_element_type=jnp.float32)
        acc = part if acc is None else acc + part
    return acc


def _blocked_kernel(*refs, n: int, m: int, bits: int, slots_every: int):
    x_refs, v_refs = refs[:m], refs[m : m + n]
    c_ref, o_ref, acc_ref = refs[m + n :]
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    shift = lax.div(k, slots_every) * (n * bits)
    code = c_ref[...].astype(jnp.int32) >> shift
    xs = [r[...] for r in x_refs]
    vs = [r[...] for r in v_refs]
    acc_ref[...] += _tile_dot(xs, vs, code, n=n, m=m, bits=bits)

    @pl.when(k == pl.num_programs(2) - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(
    jax.jit, static_argnames=("n", "m", "bits", "per", "gt", "bm", "bn", "interpret")
)
def nm_matmul_blocked(x2, values, codes, *, n, m, bits, per, gt, bm, bn, interpret):
    """``x2``: ``(M, m*G)`` plane-split ``x``; ``M % bm == 0``, ``N % bn == 0``, ``R % gt == 0``."""
    from jax.experimental.pallas import tpu as pltpu

    mm = x2.shape[0]
    g = x2.shape[1] // m
    cols = values.shape[1]
    ng, nr = g // gt, (g // per) // gt
    x_specs = [pl.BlockSpec((bm, gt), lambda i, j, k, r=r: (i, r * ng + k)) for r in range(m)]
    v_specs = [pl.BlockSpec((gt, bn), lambda i, j, k, t=t: (t * ng + k, j)) for t in range(n)]
    c_spec = pl.BlockSpec((gt, bn), lambda i, j, k: (k % nr, j))
    params = None
    if not interpret:
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    return pl.pallas_call(
        functools.partial(_blocked_kernel, n=n, m=m, bits=bits, slots_every=nr),
        grid=(mm // bm, cols // bn, ng),
        in_specs=[*x_specs, *v_specs, c_spec],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mm, cols), x2.dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=params,
        interpret=interpret,
        name="nm_matmul",
    )(*([x2] * m), *([values] * n), codes)


def _gpu_kernel(x_ref, v_ref, c_ref, o_ref, *, n: int, m: int, bits: int, gt: int, per: int):
    g = x_ref.shape[1] // m
    rows = g // per

    def body(k, acc):
        g0 = pl.multiple_of(k * gt, gt)
        # Plane r of this K tile: columns (g0 + i) * m + r of x, read with a strided load
        # (so x is used in place, never rewritten).
        xs = [x_ref[:, pl.ds(g0 * m + r, gt, stride=m)] for r in range(m)]
        vs = [v_ref[pl.ds(t * g + g0, gt), :] for t in range(n)]
        code = c_ref[pl.ds(lax.rem(g0, rows), gt), :].astype(jnp.int32) >> (
            lax.div(g0, rows) * (n * bits)
        )
        return acc + _tile_dot(xs, vs, code, n=n, m=m, bits=bits)

    acc = lax.fori_loop(0, g // gt, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=(
        "n",
        "m",
        "bits",
        "per",
        "gt",
        "bm",
        "bn",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def nm_matmul_gpu(
    x2, values, codes, *, n, m, bits, per, gt, bm, bn, num_warps=4, num_stages=3, interpret=False
):
    """GPU (Triton) flavour of :func:`nm_matmul_blocked`, except that ``x2`` is ``x`` itself
    (``(M, K)`` in its natural order; the planes are read with strided loads)."""
    mm, kk = x2.shape
    cols = values.shape[1]
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(
        functools.partial(_gpu_kernel, n=n, m=m, bits=bits, gt=gt, per=per),
        grid=(mm // bm, cols // bn),
        in_specs=[
            pl.BlockSpec((bm, kk), lambda i, j: (i, 0)),
            pl.BlockSpec((values.shape[0], bn), lambda i, j: (0, j)),
            pl.BlockSpec((codes.shape[0], bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mm, cols), x2.dtype),
        compiler_params=params,
        interpret=interpret,
        name="nm_matmul_gpu",
    )(x2, values, codes)
