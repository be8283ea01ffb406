"""Exact counts on realistic, large leaves (every radix digit exercised), vs argsort."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sparsejax import masks


def reference_global(scores: list[np.ndarray], k: int) -> list[np.ndarray]:
    flat = np.concatenate([s.ravel() for s in scores])
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    out, offset = [], 0
    for s in scores:
        out.append(keep[offset:offset + s.size].reshape(s.shape))
        offset += s.size
    return out


@pytest.mark.parametrize("kind", ["normal", "adam_like", "quantized"])
def test_global_and_layerwise_large_vs_argsort(kind):
    rng = np.random.default_rng(7)
    shapes = [(64, 256), (256, 64), (300, 257)]
    if kind == "normal":
        scores = [np.abs(rng.normal(size=s)).astype(np.float32) * 0.02 for s in shapes]
    elif kind == "adam_like":  # init plus a few equal-magnitude steps: near-ties everywhere
        scores = [np.abs(rng.normal(size=s).astype(np.float32) * 0.02
                         + np.float32(3e-3) * np.sign(rng.normal(size=s)).astype(np.float32))
                  for s in shapes]
    else:  # heavy exact ties
        scores = [np.round(np.abs(rng.normal(size=s)) * 8).astype(np.float32) for s in shapes]
    tree = {f"l{i}": s for i, s in enumerate(scores)}
    prunable = {k: True for k in tree}
    total = sum(s.size for s in scores)
    glob = jax.jit(lambda t, s: masks.global_topk(t, s, prunable))
    for s in (0.083, 0.5, 0.9, 0.999):
        got = glob(tree, s)
        k = total - int(np.round(np.float32(s) * np.float32(total)))
        for i, ref in enumerate(reference_global(scores, k)):
            np.testing.assert_array_equal(np.asarray(got[f"l{i}"]), ref, err_msg=f"{kind} {s}")
        one = np.asarray(jax.jit(masks.sparsity_mask)(scores[2], s))
        k2 = scores[2].size - int(np.round(np.float32(s) * np.float32(scores[2].size)))
        np.testing.assert_array_equal(one, reference_global([scores[2]], k2)[0])
