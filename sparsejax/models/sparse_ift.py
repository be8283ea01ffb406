"""Sparse Iso-FLOP Transformations (Sparse-IFT; Thangarasa et al., 2023, "Sparse Iso-FLOP
Transformations for Maximizing Training Efficiency").

Each transformation replaces a dense linear layer ``d_in -> d_out`` by a wider or deeper one
whose *sparse* parts, at sparsity ``s``, cost the dense layer's FLOPs per token
(``2·d_in·d_out``, Section 2 of the paper):

* **Parallel** (:class:`SparseParallel`): ``k = round(1/(1 − s))`` sparse branches summed,
  ``2·k(1 − s)·d_in·d_out`` FLOPs.
* **Factorized** (:class:`SparseFactorized`): ``U: d_in -> r``, an optional nonlinearity,
  ``V: r -> d_out``, both sparse, ``r = ceil(d_in·d_out / ((1 − s)(d_in + d_out)))``;
  ``2(1 − s)·r(d_in + d_out)`` FLOPs.
* **Doped** (:class:`SparseDoped`): a sparse ``W`` plus a *dense* low-rank ``U V`` with
  ``r = floor(s·d_in·d_out / (d_in + d_out))``; ``2(1 − s)·d_in·d_out + 2r(d_in + d_out)``.
* **Wide** (model level, :func:`widen`): ``d_model`` and ``d_ff`` scaled by
  ``sqrt(1/(1 − s))`` and rounded up to a multiple of ``n_head`` (of ``2·n_head`` with rotary
  positions, whose head dim must be even; of the block size too on BSR layers); a run
  (:mod:`sparsejax.run.build`) trains every linear at its own iso-FLOP sparsity,
  :func:`wide_layer_sparsity` (``s`` itself without the rounding). The LM head and attention
  scores grow with ``d_model``.

The layers hold plain linear sub-layers built by a *base* factory (``nnx.Linear`` masked by
any :class:`sparsejax.methods.MaskMethod` through :func:`sparsejax.sparsify`, or
``pallas_kernels.layers.BSRLinear`` with a static block mask). Masks land only on the sparse
parts: their kernels are prunable under :data:`sparsejax.prunable.default_prunable`, while
Doped's dense path lives under a ``lowrank`` component, which the default predicate keeps dense.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax import masks as masks_lib
from sparsejax.models.layers import INIT_STD, LinearFactory, build_linear, dense_linear, matmul

FAMILIES: tuple[str, ...] = ("wide", "parallel", "factorized", "doped")
LAYER_FAMILIES: tuple[str, ...] = ("parallel", "factorized", "doped")  # per-layer transforms


def check_sparsity(s: Any, name: str = "sparsity") -> float:
    """``s`` as a float, or ``ValueError`` unless it is a real number in [0, 1)."""
    if isinstance(s, bool) or not isinstance(s, int | float) or not 0.0 <= float(s) < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1) (Sparse-IFT sparsity), got {s!r}")
    return float(s)


def _check_dims(**dims: Any) -> None:
    for name, v in dims.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _density(s: float) -> Fraction:
    return 1 - Fraction(str(s))  # the decimal as written: no float error in ceil/floor


def parallel_branches(s: float) -> int:
    """``k = round(1/(1 − s))`` sparse branches (Sparse Parallel); 1 at ``s = 0``.

    >>> parallel_branches(0.5), parallel_branches(0.75), parallel_branches(0.9)
    (2, 4, 10)
    """
    s = check_sparsity(s)
    return max(1, round(1 / _density(s)))


def factorized_rank(d_in: int, d_out: int, s: float, *, multiple: int = 1) -> int:
    """``r = ceil(d_in·d_out / ((1 − s)(d_in + d_out)))`` (Sparse Factorized), rounded up to a
    multiple of ``multiple`` (the block size on BSR layers).

    >>> factorized_rank(64, 64, 0.5), factorized_rank(64, 256, 0.5), factorized_rank(64, 256, 0.75)
    (64, 103, 205)
    """
    _check_dims(d_in=d_in, d_out=d_out, multiple=multiple)
    s = check_sparsity(s)
    r = math.ceil(Fraction(d_in * d_out) / (_density(s) * (d_in + d_out)))
    return -(-r // multiple) * multiple


def doped_rank(d_in: int, d_out: int, s: float) -> int:
    """``r = floor(s·d_in·d_out / (d_in + d_out))`` of Sparse Doped's dense low-rank path.

    >>> doped_rank(64, 64, 0.5), doped_rank(64, 256, 0.75), doped_rank(64, 64, 0.0)
    (16, 38, 0)
    """
    _check_dims(d_in=d_in, d_out=d_out)
    s = check_sparsity(s)
    return math.floor(Fraction(str(s)) * d_in * d_out / (d_in + d_out))


def wide_factor(s: float) -> float:
    """Sparse Wide's width multiplier ``sqrt(1/(1 − s))``.

    >>> wide_factor(0.75), round(wide_factor(0.5), 6)
    (2.0, 1.414214)
    """
    s = check_sparsity(s)
    return math.sqrt(1.0 / (1.0 - s))


def _round_up(x: float, multiple: int) -> int:
    return math.ceil(x / multiple - 1e-9) * multiple  # 1e-9: 64·2.0 stays 128 exactly


def wide_dims(d_model: int, d_ff: int, s: float, *, multiple: int,
              ff_multiple: int | None = None) -> tuple[int, int]:
    """``(d_model', d_ff')``: both scaled by :func:`wide_factor` and rounded up to a multiple
    of ``multiple`` (``n_head`` in the paper's recipe; ``ff_multiple`` for ``d_ff`` if given).

    >>> wide_dims(64, 256, 0.75, multiple=4), wide_dims(64, 256, 0.5, multiple=4)
    ((128, 512), (92, 364))
    """
    ff_multiple = multiple if ff_multiple is None else ff_multiple
    _check_dims(d_model=d_model, d_ff=d_ff, multiple=multiple, ff_multiple=ff_multiple)
    f = wide_factor(s)
    return _round_up(d_model * f, multiple), _round_up(d_ff * f, ff_multiple)


def widen(cfg: Any, s: float, *, block: int | None = None) -> Any:
    """A ``GPTConfig`` widened by Sparse Wide: ``d_model``/``d_ff`` from :func:`wide_dims`
    rounded up to multiples of ``n_head`` (``d_model`` of ``2·n_head`` under rotary
    positions, so the head dim stays even; both also of the BSR ``block`` where given, so
    that every linear tiles into blocks).

    >>> from sparsejax.models.gpt import GPTConfig
    >>> c = widen(GPTConfig.from_variant("tiny"), 0.5)
    >>> c.d_model, c.d_ff
    (96, 364)
    """
    multiple, ff_multiple = cfg.n_head * (2 if cfg.pos == "rope" else 1), cfg.n_head
    if block is not None:
        _check_dims(block=block)
        multiple, ff_multiple = math.lcm(multiple, block), math.lcm(ff_multiple, block)
    d_model, d_ff = wide_dims(cfg.d_model, cfg.d_ff, s, multiple=multiple,
                              ff_multiple=ff_multiple)
    return dataclasses.replace(cfg, d_model=d_model, d_ff=d_ff)


def wide_sparsity(d_model: int, d_ff: int, wide_d_model: int, wide_d_ff: int) -> float:
    """The sparsity at which a widened GPT block's linears cost the dense block's FLOPs exactly:
    ``1 − (4d² + 2d·f) / (4d'² + 2d'·f')`` (four ``d×d`` attention linears, two ``d×f`` MLP
    ones). Without rounding it is ``s`` itself; rounding the widths up (:func:`widen`) makes
    it slightly larger, so that Sparse Wide stays iso-FLOP instead of paying for the rounding
    (each layer then lands within about 1% of its dense FLOPs, where one sparsity for all
    would miss by the rounding: +12.5% on the tiny model's attention at ``s = 0.5``).

    >>> wide_sparsity(64, 256, 128, 512)
    0.75
    >>> round(wide_sparsity(64, 256, 96, 364), 4)  # s = 0.5 on the tiny model (rope)
    0.5396
    """
    _check_dims(d_model=d_model, d_ff=d_ff, wide_d_model=wide_d_model, wide_d_ff=wide_d_ff)
    if wide_d_model < d_model or wide_d_ff < d_ff:
        raise ValueError(f"widened dims ({wide_d_model}, {wide_d_ff}) must be >= the dense "
                         f"({d_model}, {d_ff})")
    dense = 4 * d_model**2 + 2 * d_model * d_ff
    return 1.0 - dense / (4 * wide_d_model**2 + 2 * wide_d_model * wide_d_ff)


def wide_layer_sparsity(d_model: int, d_ff: int, wide_d_model: int, wide_d_ff: int
                        ) -> Callable[[int, int], float]:
    """``(d_in', d_out') -> s_l``: the sparsity at which a widened linear costs exactly the
    FLOPs of the dense linear it replaces, ``1 − d_in·d_out / (d_in'·d_out')``, widened dims
    mapped back to the dense ones (``d_model' -> d_model``, ``d_ff' -> d_ff``). Rounding the
    widths up makes ``s_l`` differ between attention (``d'×d'``) and MLP (``d'×f'``) layers,
    which one sparsity for all cannot match (the tiny model at ``s = 0.5``: 0.556 and 0.531).

    >>> f = wide_layer_sparsity(64, 256, 96, 364)
    >>> round(f(96, 96), 4), round(f(96, 364), 4), round(f(364, 96), 4)
    (0.5556, 0.5311, 0.5311)
    """
    _check_dims(d_model=d_model, d_ff=d_ff, wide_d_model=wide_d_model, wide_d_ff=wide_d_ff)
    if wide_d_model == wide_d_ff and d_model != d_ff:
        raise ValueError(f"widened d_model and d_ff are both {wide_d_model}: which dense dims "
                         "a layer replaces is ambiguous")
    back = {wide_d_ff: d_ff, wide_d_model: d_model}

    def sparsity(d_in: int, d_out: int) -> float:
        if d_in not in back or d_out not in back:
            raise ValueError(f"a ({d_in}, {d_out}) linear is not one of the widened model's "
                             f"(dims {wide_d_model}, {wide_d_ff})")
        return 1.0 - back[d_in] * back[d_out] / (d_in * d_out)

    return sparsity


class WidePlan(NamedTuple):
    """Sparse Wide's widths and sparsities, computed once (:func:`plan_wide`)."""

    dense: Any  # GPTConfig of the dense model the run is iso-FLOP with
    wide: Any  # the widened GPTConfig (:func:`widen`)
    sparsity: float  # the total target: wide_sparsity(...) (slightly above s after rounding)
    layer_sparsity: Callable[[int, int], float]  # (d_in', d_out') -> iso-FLOP share


def plan_wide(cfg: Any, s: float, *, block: int | None = None) -> WidePlan:
    """The :class:`WidePlan` of GPT config ``cfg`` widened at sparsity ``s`` (``block``: the
    BSR block the widths must tile into, as in :func:`widen`).

    >>> from sparsejax.models.gpt import GPTConfig
    >>> p = plan_wide(GPTConfig.from_variant("tiny"), 0.5)
    >>> (p.wide.d_model, p.wide.d_ff), round(p.sparsity, 4), round(p.layer_sparsity(96, 96), 4)
    ((96, 364), 0.5396, 0.5556)
    """
    wide = widen(cfg, s, block=block)
    dims = (cfg.d_model, cfg.d_ff, wide.d_model, wide.d_ff)
    return WidePlan(cfg, wide, wide_sparsity(*dims), wide_layer_sparsity(*dims))


def wide_selection(layer_sparsity: Callable[[int, int], float]) -> Callable[..., Any]:
    """A mask selection ``(scores, sparsity, prunable_tree) -> masks`` (the ``allocation`` of
    :func:`sparsejax.methods.static`, :func:`~sparsejax.methods.rigl`, ...) giving every
    prunable 2-D kernel its iso-FLOP sparsity :func:`wide_layer_sparsity`; the total it is
    handed is ignored (Sparse Wide fixes it by the widths: :func:`wide_sparsity`)."""
    def select(scores: Any, sparsity: Any, prunable: Any) -> Any:
        del sparsity
        per_leaf = jax.tree.map(
            lambda sc, p: layer_sparsity(*sc.shape) if p and sc.ndim == 2 else 0.0,
            scores, prunable)
        return masks_lib.layerwise(scores, per_leaf, prunable)

    return select


def layer_flops(
    family: str, d_in: int, d_out: int, s: float, *, rank_multiple: int = 1,
    widened: tuple[int, int] | None = None,
) -> float:
    """Forward FLOPs per token of the layer replacing a dense ``d_in -> d_out`` one
    (``2 ×`` its active matmul weights; the dense layer's are ``2·d_in·d_out``).

    ``"wide"`` is the widened layer ``widened = (d_in', d_out')`` at sparsity ``s`` (default:
    both dims times :func:`wide_factor`, unrounded); ``""`` is the dense layer itself.
    """
    _check_dims(d_in=d_in, d_out=d_out)
    s = check_sparsity(s)
    density = 1.0 - s
    if family == "":
        return 2.0 * d_in * d_out
    if family == "parallel":
        return 2.0 * parallel_branches(s) * density * d_in * d_out
    if family == "factorized":
        r = factorized_rank(d_in, d_out, s, multiple=rank_multiple)
        return 2.0 * density * r * (d_in + d_out)
    if family == "doped":
        return 2.0 * density * d_in * d_out + 2.0 * doped_rank(d_in, d_out, s) * (d_in + d_out)
    if family == "wide":
        wi, wo = widened if widened is not None else (d_in * wide_factor(s), d_out * wide_factor(s))
        return 2.0 * density * wi * wo
    raise ValueError(f"family must be one of {('',) + FAMILIES}, got {family!r}")


class SparseParallel(nnx.Module):
    """Sparse Parallel: ``y = Σ_i W_i x`` over :func:`parallel_branches` ``(s)`` sparse branches
    (``branches/<i>/kernel``), the bias (if any) on branch 0 only; the branches computed in the
    compute dtype ``dtype`` and summed in float32."""

    def __init__(self, in_features: int, out_features: int, *, sparsity: float, use_bias: bool,
                 rngs: nnx.Rngs, linear: LinearFactory = dense_linear, init_scale: float = 1.0,
                 dtype: Any = None):
        k = parallel_branches(sparsity)
        self.dtype = dtype
        self.branches = nnx.List([
            build_linear(linear, in_features, out_features, use_bias=use_bias and i == 0,
                         rngs=rngs, init_scale=init_scale, dtype=dtype) for i in range(k)])

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.branches[0](x)
        if len(self.branches) == 1:
            return y
        total = y.astype(jnp.promote_types(y.dtype, jnp.float32))
        for branch in self.branches[1:]:
            total = total + branch(x).astype(total.dtype)
        return total.astype(y.dtype)


class SparseFactorized(nnx.Module):
    """Sparse Factorized: ``y = V σ(U x)`` with sparse ``U`` (``d_in -> r``) and ``V``
    (``r -> d_out``), ``r =`` :func:`factorized_rank`; ``activation`` ``σ`` defaults to none."""

    def __init__(self, in_features: int, out_features: int, *, sparsity: float, use_bias: bool,
                 rngs: nnx.Rngs, linear: LinearFactory = dense_linear,
                 activation: Callable[[jax.Array], jax.Array] | None = None,
                 rank_multiple: int = 1, init_scale: float = 1.0, dtype: Any = None):
        self.rank = factorized_rank(in_features, out_features, sparsity, multiple=rank_multiple)
        self.u = build_linear(linear, in_features, self.rank, use_bias=False, rngs=rngs,
                              dtype=dtype)
        # the residual-projection scale (``init_scale``) goes on the output factor only
        self.v = build_linear(linear, self.rank, out_features, use_bias=use_bias, rngs=rngs,
                              init_scale=init_scale, dtype=dtype)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.u(x)
        return self.v(h if self.activation is None else self.activation(h))


class LowRank(nnx.Module):
    """Dense ``x -> (x u) v`` with ``u`` ``(d_in, r)`` ~ N(0, 0.02²) and ``v`` ``(r, d_out)`` = 0
    (the path starts silent and learns through ``v``'s gradient); both matmuls in the compute
    dtype ``dtype`` with float32 accumulation (:func:`~sparsejax.models.layers.matmul`). Name it
    ``lowrank`` in its parent: the default prunable predicate keeps that component dense."""

    def __init__(self, in_features: int, rank: int, out_features: int, *, rngs: nnx.Rngs,
                 dtype: Any = None, param_dtype: Any = jnp.float32):
        self.u = nnx.Param(nnx.initializers.normal(INIT_STD)(
            rngs.params(), (in_features, rank), jnp.dtype(param_dtype)))
        self.v = nnx.Param(jnp.zeros((rank, out_features), jnp.dtype(param_dtype)))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or jnp.result_type(x.dtype, self.u.dtype)
        return matmul(matmul(x, self.u[...], dtype=dtype), self.v[...], dtype=dtype)


class SparseDoped(nnx.Module):
    """Sparse Doped: ``y = W x + (x U) V``, ``W`` sparse (``sparse/kernel``), ``U V`` dense of
    rank :func:`doped_rank` (``lowrank/u``, ``lowrank/v``; absent when the rank is 0); both
    paths in the compute dtype ``dtype``, summed in float32."""

    def __init__(self, in_features: int, out_features: int, *, sparsity: float, use_bias: bool,
                 rngs: nnx.Rngs, linear: LinearFactory = dense_linear, dtype: Any = None,
                 param_dtype: Any = jnp.float32, init_scale: float = 1.0):
        self.rank = doped_rank(in_features, out_features, sparsity)
        self.sparse = build_linear(linear, in_features, out_features, use_bias=use_bias,
                                   rngs=rngs, init_scale=init_scale, dtype=dtype)
        self.lowrank = (LowRank(in_features, self.rank, out_features, rngs=rngs, dtype=dtype,
                                param_dtype=param_dtype) if self.rank else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.sparse(x)
        if self.lowrank is None:
            return y
        acc = jnp.promote_types(y.dtype, jnp.float32)
        return (y.astype(acc) + self.lowrank(x).astype(acc)).astype(y.dtype)


def factory(family: str, sparsity: float, *, base: LinearFactory = dense_linear,
            rank_multiple: int = 1, param_dtype: Any = jnp.float32) -> LinearFactory:
    """A model linear factory ``(in, out, *, use_bias, rngs[, init_scale][, dtype]) -> module``
    for ``family``.

    ``base`` builds every sparse part (the masked linears); ``"wide"`` returns ``base`` itself
    (the widening is :func:`widen`'s, at the model level). ``rank_multiple`` rounds the
    factorized rank (the block size on BSR layers); ``param_dtype`` is the storage dtype of
    Doped's dense low-rank path. The model hands the compute ``dtype`` to every layer, which
    hands it to ``base``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    sparsity = check_sparsity(sparsity)
    if family == "wide":
        return base
    if family == "parallel":
        return functools.partial(SparseParallel, sparsity=sparsity, linear=base)
    if family == "factorized":
        return functools.partial(SparseFactorized, sparsity=sparsity, linear=base,
                                 rank_multiple=rank_multiple)
    return functools.partial(SparseDoped, sparsity=sparsity, linear=base, param_dtype=param_dtype)
