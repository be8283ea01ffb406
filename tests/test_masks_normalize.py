"""``masks.global_topk`` with every per-leaf normalisation against a numpy reference written
from the definition: divide each leaf's scores by its l1 / l2 / max / mean *absolute*
magnitude, then keep the ``n - round(s n)`` highest (ties: earlier leaf, lower index)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from sparsejax import masks

NORMS = {
    None: lambda a: 1.0,
    "l1": lambda a: np.abs(a).sum(),
    "l2": lambda a: np.sqrt((a.astype(np.float64) ** 2).sum()),
    "max": lambda a: np.abs(a).max(),
    "mean": lambda a: np.abs(a).mean(),
}


def reference(scores: dict[str, np.ndarray], sparsity: float, normalize) -> dict[str, np.ndarray]:
    names = sorted(scores)  # the pytree's flatten order for a dict
    flat = np.concatenate([(scores[k] / NORMS[normalize](scores[k])).ravel() for k in names])
    n = flat.size
    keep = n - int(np.round(np.float32(sparsity) * np.float32(n)))
    order = np.argsort(-flat, kind="stable")
    kept = np.zeros(n, bool)
    kept[order[:keep]] = True
    out, start = {}, 0
    for k in names:
        out[k] = kept[start:start + scores[k].size].reshape(scores[k].shape)
        start += scores[k].size
    return out


@functools.partial(jax.jit, static_argnames="normalize")
def _global_topk(scores, sparsity, normalize):
    """One compile per normaliser (op-by-op dispatch compiles each op at each shape)."""
    return masks.global_topk(scores, sparsity, {k: True for k in scores}, normalize=normalize)


@pytest.mark.parametrize("normalize", [None, "l1", "l2", "max", "mean"])
@pytest.mark.parametrize("sparsity", [0.3, 0.75])
def test_global_topk_normalizers_match_reference(normalize, sparsity):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
    # signed scores on very different scales: max(x) != max(|x|), sum(x) != sum(|x|)
    scores = {
        "a": np.asarray(jax.random.normal(k1, (12, 10))) * 5.0 - 2.0,
        "b": np.asarray(jax.random.normal(k2, (6, 20))) * 0.1,
        "c": np.asarray(jax.random.normal(k3, (30,))) * 50.0 - 40.0,
    }
    got = _global_topk({k: np.float32(v) for k, v in scores.items()}, sparsity, normalize)
    want = reference({k: v.astype(np.float32) for k, v in scores.items()}, sparsity, normalize)
    for k in scores:
        np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=f"{normalize} {k}")
