"""SquareHead distillation's loss (Kurtic et al. 2023, ``sparsejax.run.distill``) against
hand-worked values and a float64 numpy reference: CE, the KL direction (teacher to student),
the temperature and the per-layer normalised feature term. No trained run, so a broken term
fails in seconds (the fine-tuning run that uses it is in tests/test_downstream.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.run.distill import SquareHeadWeights, squarehead_terms


def test_squarehead_hand_worked():
    # teacher p = (1/2, 1/2), student p = (3/4, 1/4), target 0:
    # CE = -ln(3/4); KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3);
    # layer 1: h_t = (1, -1), h_s = (2, 0): mean sq diff 1, mean h_t^2 1 -> 1/(1 + eps)
    # layer 2: h_t = (2, 0), h_s = (2, 2): 2 / 2 -> 1/(1 + eps)... with eps = 0.5: 2/3 and 2/2.5
    s_logits = jnp.asarray([[[np.log(3.0), 0.0]]])
    t_logits = jnp.zeros((1, 1, 2))
    hs = [jnp.asarray([[[2.0, 0.0]]]), jnp.asarray([[[2.0, 2.0]]])]
    ht = [jnp.asarray([[[1.0, -1.0]]]), jnp.asarray([[[2.0, 0.0]]])]
    w = SquareHeadWeights(h_ce=1.0, h_kl=2.0, h_sq=3.0, temperature=1.0, eps=0.5)
    got = jax.jit(squarehead_terms)(s_logits, hs, t_logits, ht, jnp.asarray([[0]]), w)
    ce, kl, feat = -np.log(0.75), 0.5 * np.log(4 / 3), 1 / 1.5 + 2 / 2.5
    np.testing.assert_allclose(float(got.ce), ce, rtol=1e-6)
    np.testing.assert_allclose(float(got.kl), kl, rtol=1e-6)
    np.testing.assert_allclose(float(got.feature), feat, rtol=1e-6)
    np.testing.assert_allclose(float(got.loss), ce + 2 * kl + 3 * feat, rtol=1e-6)


def test_squarehead_matches_float64_reference():
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(2, 3, 7)) * 2, rng.normal(size=(2, 3, 7)) * 2
    hs, ht = rng.normal(size=(4, 2, 3, 5)), rng.normal(size=(4, 2, 3, 5)) * 3
    y = rng.integers(0, 7, size=(2, 3))
    w = SquareHeadWeights(h_ce=0.5, h_kl=1.5, h_sq=0.25, temperature=2.0, eps=1e-6)

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ce = -np.take_along_axis(log_softmax(s), y[..., None], -1).mean()
    lt, ls = log_softmax(t / 2), log_softmax(s / 2)
    kl = (np.exp(lt) * (lt - ls)).sum(-1).mean()
    feat = sum(((a - b) ** 2).mean() / ((b**2).mean() + 1e-6) for a, b in zip(hs, ht,
                                                                             strict=True))
    ref = 0.5 * ce + 1.5 * 4 * kl + 0.25 * feat
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    got = jax.jit(squarehead_terms)(f32(s), list(map(f32, hs)), f32(t), list(map(f32, ht)),
                                    jnp.asarray(y), w)
    np.testing.assert_allclose(float(got.loss), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="layer by layer"):
        squarehead_terms(f32(s), list(map(f32, hs[:3])), f32(t), list(map(f32, ht)),
                         jnp.asarray(y), w)
