"""N:M structured sparsity: keep the N largest of every M consecutive weights along the
contraction (input) axis of each kernel (Mishra et al. 2021, "Accelerating Sparse Deep Neural
Networks"; Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From
Scratch").

Masks are recomputed from the score every ``update_every`` steps from ``begin_step``.
"""

from __future__ import annotations

import warnings

from sparsejax import masks as masks_lib
from sparsejax import prunable as prunable_lib
from sparsejax import scores as scores_lib
from sparsejax.axes import AxisSpec, check_spec
from sparsejax.methods.base import MaskMethod, constant_target, dense_masks, periodic


def nm(
    n: int,
    m: int,
    *,
    score: str = "magnitude",
    axis: AxisSpec = "contraction",
    skip_indivisible: bool = False,
    update_every: int = 1,
    begin_step: int = 0,
) -> MaskMethod:
    """N:M masks: the ``n`` largest of every ``m`` consecutive weights along each kernel's
    contraction axes (:mod:`sparsejax.axes`).

    Args:
      n, m: keep ``n`` of every ``m`` (``0 <= n <= m``).
      score: ``"magnitude"``, ``"saliency"`` or ``"random"``.
      axis: ``"contraction"`` (default) groups along axis 0 of a Dense / ``nnx.Linear``
        ``(in, out)`` kernel; along ``Cin`` (axis -2) of a Conv or ConvTranspose ``(H, W, Cin,
        Cout)`` kernel (``ConvTranspose(transpose_kernel=True)`` stores ``(H, W, Cout, Cin)``:
        give those ``axis=-1``); along ``d`` (axis 0) of attention ``query/key/value`` ``(d, heads,
        head_dim)`` kernels; along the flattened ``(heads, head_dim)`` (axes 0, 1) of the
        attention ``out`` ``(heads, head_dim, d)`` kernel. Other kernels (``DenseGeneral``
        with several input or output axes, custom layers) raise ``ValueError`` naming the
        leaf. Pass an int, a tuple of consecutive axes (flattened: groups of M consecutive
        rows of the ``(prod(axes), rest)`` matrix), or ``{"path regex": axis}`` for per-leaf
        axes (other leaves use the default).
      skip_indivisible: leaves whose grouped size M does not divide are an error (one
        ``ValueError`` lists them all) unless this is set; then they stay dense, ``init``
        warns naming them, and ``masks.nm_plan(params, m, prunable_tree(params), ...)`` or
        ``sparsejax.describe(params)`` shows them.
      update_every, begin_step: masks are recomputed every ``update_every`` steps from
        ``begin_step``.
    """
    masks_lib.check_nm(n, m)
    check_spec(axis)
    if not isinstance(skip_indivisible, bool):
        raise ValueError(f"skip_indivisible must be a bool, got {skip_indivisible!r}")
    score_fn = scores_lib.get(score)
    if not (isinstance(update_every, int) and update_every >= 1):
        raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")
    if not (isinstance(begin_step, int) and begin_step >= 0):
        raise ValueError(f"begin_step must be an int >= 0, got {begin_step!r}")

    def check_shapes(params, prunable):
        tree = prunable_lib.prunable_tree(params, prunable)
        plan = masks_lib.nm_plan(params, m, tree, axis=axis, skip_indivisible=skip_indivisible)
        if plan.skipped:
            warnings.warn(
                f"nm {n}:{m}: {len(plan.skipped)} prunable leaves left dense "
                f"(skip_indivisible=True): {plan.skipped}", stacklevel=3,
            )

    def init(params, key, prunable):
        del key
        check_shapes(params, prunable)
        return dense_masks(params, prunable), ()

    def update(params, grads, masks, state, step, key, prunable):
        tree = prunable_lib.prunable_tree(params, prunable)
        new = masks_lib.nm_masks(
            score_fn(params, grads, key), n, m, tree, axis=axis, skip_indivisible=skip_indivisible
        )
        return new, state

    return MaskMethod(
        init, update, periodic(update_every, begin_step),
        target=constant_target(1.0 - n / m), name=f"nm/{n}:{m}",
    )
