"""The batched solver's derivatives against finite differences, and its optimum against scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize as scipy_minimize

from scaling import forms
from scaling.passes import build_ops, evaluate
from scaling.solver import LSEModel, Penalty, minimize, objective


def _chinchilla_model(seed=0, n=40, space="log"):
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(np.log(1e7), np.log(1e10), n))
    D = np.exp(rng.uniform(np.log(1e9), np.log(1e12), n))
    loss = (1.7 + 400 / N**0.33 + 1500 / D**0.3) * np.exp(rng.normal(0, 0.01, n))
    design = forms.CHINCHILLA.design({"N": N, "D": D})
    target = np.log(loss) if space == "log" else loss
    return LSEModel(design, np.zeros((3, n)), target)


def _fd_grad(model, pen, theta, w, h=1e-6):
    g = np.zeros_like(theta)
    for j in range(theta.size):
        e = np.zeros_like(theta)
        e[j] = h
        fp = objective(model, theta + e, penalty=pen, weights=w)[0]
        fm = objective(model, theta - e, penalty=pen, weights=w)[0]
        g[j] = (fp - fm) / (2 * h)
    return g


@pytest.mark.parametrize("space", ["log", "linear"])
@pytest.mark.parametrize("asym", [0.5, 0.8])
def test_gradient_and_exact_hessian_match_finite_differences(space, asym):
    model = _chinchilla_model(space=space)
    # delta large enough that most residuals sit in the quadratic zone: a smooth region
    pen = Penalty(delta=0.2 if space == "log" else 1.0, asymmetry=asym, space=space)
    theta = np.array([6.0, 7.5, 0.55, 0.34, 0.31])
    w = np.random.default_rng(1).uniform(0.5, 2.0, model.target.shape[0])
    ops = build_ops(model)
    f, _, g, h = evaluate(ops, pen, theta[None], w[None], exact_next=np.array([True]))
    np.testing.assert_allclose(f[0], objective(model, theta, penalty=pen, weights=w)[0])
    np.testing.assert_allclose(g[0], _fd_grad(model, pen, theta, w), rtol=1e-5, atol=1e-9)
    hess_fd = np.zeros((5, 5))
    for j in range(5):
        e = np.zeros(5)
        e[j] = 1e-5
        gp = evaluate(ops, pen, (theta + e)[None], w[None])[2][0]
        gm = evaluate(ops, pen, (theta - e)[None], w[None])[2][0]
        hess_fd[:, j] = (gp - gm) / 2e-5
    np.testing.assert_allclose(h[0], hess_fd, rtol=1e-4, atol=1e-7)


def test_irls_matrix_is_weighted_gauss_newton():
    model = _chinchilla_model()
    pen = Penalty(delta=1e-3)
    theta = np.array([6.0, 7.5, 0.55, 0.34, 0.31])
    _, _, _, h = evaluate(build_ops(model), pen, theta[None], None)
    # independent: J = d log-pred / d theta, weights min(1, delta/|r|)
    u = np.einsum("knp,p->kn", model.design, theta)
    p = np.exp(u - u.max(0))
    p /= p.sum(0)
    jac = np.einsum("kn,knp->np", p, model.design)
    r = np.log(np.exp(u).sum(0)) - model.target
    wts = np.minimum(1.0, 1e-3 / np.abs(r))
    np.testing.assert_allclose(h[0], jac.T @ (wts[:, None] * jac), rtol=1e-10)


def _numpy_huber_lse(model, delta):
    """Independent float64 objective and analytic gradient (Chinchilla design only)."""
    x, y = -model.design[0, :, 3], -model.design[1, :, 4]
    lo = model.target

    def fg(t):
        a, b, e, al, be = t
        u = np.stack([a - al * x, b - be * y, np.full_like(x, e)])
        m = u.max(0)
        p = np.exp(u - m)
        s = p.sum(0)
        p /= s
        r = m + np.log(s) - lo
        f = np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
        d = np.clip(r, -delta, delta)
        return f, np.array([d @ p[0], d @ p[1], d @ p[2], -(d * x) @ p[0], -(d * y) @ p[1]])

    return fg


def test_minimize_reaches_a_minimum_scipy_cannot_improve():
    model = _chinchilla_model(seed=3, n=60)
    pen = Penalty(delta=1e-3)
    starts = np.array([[5.0, 5.0, 0.0, 0.5, 0.5], [10.0, 10.0, 0.5, 1.0, 1.0], [0, 20, 1, 0, 1.5]])
    res = minimize(model, starts, penalty=pen)
    fg = _numpy_huber_lse(model, 1e-3)
    assert res.converged.all()
    for t, f in zip(res.theta, res.objective, strict=True):
        np.testing.assert_allclose(fg(t)[0], f, rtol=1e-12)
    best = np.argmin(res.objective)
    polished = scipy_minimize(fg, res.theta[best], jac=True, method="L-BFGS-B")
    assert polished.fun >= res.objective[best] * (1 - 1e-7)
    from_starts = min(scipy_minimize(fg, s, jac=True, method="L-BFGS-B").fun for s in starts)
    assert res.objective[best] <= from_starts * (1 + 1e-7)


def test_weights_shape_and_penalty_are_validated():
    model = _chinchilla_model(n=10)
    with pytest.raises(ValueError, match="weights"):
        minimize(model, np.zeros((2, 5)), weights=np.ones((3, 10)))
    with pytest.raises(ValueError, match="asymmetry"):
        minimize(model, np.zeros((1, 5)), penalty=Penalty(asymmetry=1.0))
    with pytest.raises(ValueError, match="columns"):
        minimize(model, np.zeros((1, 4)))


@pytest.mark.parametrize("space", ["log", "linear"])
def test_four_term_model_with_offsets_mixed_batch_matches_finite_differences(space):
    """Frantar form with ``g`` fixed (a constant term carried by the offset) and a batch that
    mixes exact-Hessian and IRLS rows: each row equals its own single-row evaluation."""
    rng = np.random.default_rng(2)
    n = 30
    data = {
        "S": rng.choice([0.0, 0.5, 0.75], n),
        "N": np.exp(rng.uniform(16, 21, n)),
        "D": np.exp(rng.uniform(20, 25, n)),
    }
    loss = 2.0 + rng.uniform(0.1, 1.0, n)
    target = np.log(loss) if space == "log" else loss
    model, free, _ = forms.build_model(forms.FRANTAR, data, target, {"g": 1.5})
    assert free.sum() == 6 and np.any(model.offset != 0)
    pen = Penalty(delta=0.3, asymmetry=0.6, space=space)
    theta = np.array([[4.0, 1.0, 3.0, 0.3, 5.0, 0.25], [3.5, 1.2, 2.5, 0.25, 4.0, 0.2]])
    ops = build_ops(model)
    exact = np.array([True, False])
    f, _, g, h = evaluate(ops, pen, theta, None, exact_next=exact)
    for i in range(2):
        fi, _, gi, hi = evaluate(ops, pen, theta[i : i + 1], None, exact_next=exact[i : i + 1])
        np.testing.assert_allclose(f[i], fi[0], rtol=1e-13)
        np.testing.assert_allclose(h[i], hi[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(g[i], _fd_grad(model, pen, theta[i], None), rtol=1e-5, atol=1e-9)
    hess_fd = np.zeros((6, 6))
    for j in range(6):
        e = np.zeros(6)
        e[j] = 1e-5
        gp = evaluate(ops, pen, (theta[0] + e)[None], None)[2][0]
        gm = evaluate(ops, pen, (theta[0] - e)[None], None)[2][0]
        hess_fd[:, j] = (gp - gm) / 2e-5
    np.testing.assert_allclose(h[0], hess_fd, rtol=1e-4, atol=1e-7)
