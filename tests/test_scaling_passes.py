"""The solver's compiled passes (``scaling.passes``) against float64 numpy references written
here from the definitions: the asymmetric Huber objective, its gradient, the IRLS matrix, the
exact Hessian and the damped Newton steps."""

from __future__ import annotations

import os

import numpy as np
import pytest

from scaling import forms
from scaling.passes import LSEModel, Penalty, build_ops, evaluate
from scaling.solver import damped_steps, objective


def _chinchilla(seed=0, n=60, space="log"):
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(np.log(1e7), np.log(1e10), n))
    D = np.exp(rng.uniform(np.log(1e9), np.log(1e12), n))
    loss = (1.7 + 400 / N**0.33 + 1500 / D**0.3) * np.exp(rng.normal(0, 0.01, n))
    design = forms.CHINCHILLA.design({"N": N, "D": D})
    return LSEModel(design, np.zeros((3, n)), np.log(loss) if space == "log" else loss)


def _frantar(seed=1, n=50, space="log"):
    rng = np.random.default_rng(seed)
    S = rng.choice([0.0, 0.5, 0.75, 0.9], n)
    N = np.exp(rng.uniform(np.log(1e6), np.log(1e8), n))
    D = np.exp(rng.uniform(np.log(1e8), np.log(1e10), n))
    loss = (20 * (1 - S) ** 1.5 + 5) * N**-0.3 + 30 * D**-0.25 + 1.5
    design = forms.FRANTAR.design({"S": S, "N": N, "D": D})
    offset = np.zeros((4, n))
    offset[2] = -0.05 * np.log(D)  # a per-point offset, as a fixed coefficient makes
    return LSEModel(design, offset, np.log(loss) if space == "log" else loss)


def _custom(seed=2, n=30, space="log"):
    """Column kinds the built-in laws lack: a constant -1 column on a varying term (through its
    offset), non-unit columns on a term that is the same at every point, a column shared by a
    varying and a constant term."""
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(1.0, 3.0, n), rng.uniform(0.0, 2.0, n)
    design = np.zeros((3, n, 4))
    design[0, :, 0], design[0, :, 1] = 1.0, -x
    design[1, :, 2] = -1.0
    design[2, :, 3], design[2, :, 2] = 0.5, 2.0
    offset = np.zeros((3, n))
    offset[1] = 0.3 * y
    loss = np.exp(rng.normal(0.5, 0.2, n))
    return LSEModel(design, offset, np.log(loss) if space == "log" else loss)


def _reference(model, pen, theta, w):
    """Objective, gradient, IRLS matrix and exact Hessian of one start, from the definitions:
    ``f = sum_i w_i kappa_i Huber(r_i)``, ``r = pred - obs``, ``kappa = 2 asymmetry`` where
    the observation lies above the prediction, else ``2 (1 - asymmetry)``."""
    m, obs, delta, tau = model.design, model.target, pen.delta, pen.asymmetry
    e = np.exp(np.einsum("knp,p->kn", m, theta) + model.offset)  # (K, n)
    mm = np.einsum("knp,knq->knpq", m, m)
    if pen.space == "log":  # pred = log sum_k e_k
        pred, share = np.log(e.sum(0)), e / e.sum(0)
        jac = np.einsum("kn,knp->np", share, m)
        d2 = np.einsum("kn,knpq->npq", share, mm) - np.einsum("np,nq->npq", jac, jac)
    else:  # pred = sum_k e_k
        pred = e.sum(0)
        jac = np.einsum("kn,knp->np", e, m)
        d2 = np.einsum("kn,knpq->npq", e, mm)
    r = pred - obs
    kappa = np.where(obs > pred, 2.0 * tau, 2.0 * (1.0 - tau))
    wk = w * kappa
    quadratic = np.abs(r) <= delta
    huber = np.where(quadratic, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    dhuber = np.where(quadratic, r, delta * np.sign(r))
    f = np.sum(wk * huber)
    g = jac.T @ (wk * dhuber)
    irls = np.einsum("n,np,nq->pq", wk * np.minimum(1.0, delta / np.abs(r)), jac, jac)
    exact = np.einsum("n,np,nq->pq", wk * quadratic, jac, jac)
    exact += np.einsum("n,npq->pq", wk * dhuber, d2)
    return f, g, irls, exact


def _theta(make, b, rng):
    if make is _chinchilla:
        return rng.uniform([0, 0, -1, 0, 0], [25, 25, 1, 2, 2], (b, 5))
    if make is _custom:
        return rng.uniform(-1.0, 1.0, (b, 4))
    return rng.uniform(-1.0, 3.0, (b, 7)) * np.array([1, 0.5, 1, 0.3, 1, 0.3, 0.5])


def test_asymmetric_huber_objective_and_gradient_match_the_definition():
    """Residuals on both sides of the fit and in both Huber zones, weights per point, three
    asymmetries: a sign error in the residual, the asymmetry weight or the Huber derivative
    changes f or g here (issue 17: today a consistent sign flip is caught by one fit test)."""
    model = _chinchilla(seed=7, n=80)
    theta = np.array([[5.99, 7.31, 0.53, 0.33, 0.3], [6.1, 7.2, 0.52, 0.335, 0.29]])
    w = np.random.default_rng(8).uniform(0.5, 2.0, (2, 80))
    for tau in (0.2, 0.5, 0.85):
        pen = Penalty(delta=0.005, asymmetry=tau, space="log")
        f, ok, g, _ = evaluate(build_ops(model), pen, theta, w)
        assert ok.all()
        np.testing.assert_allclose(objective(model, theta, penalty=pen, weights=w), f, rtol=0)
        for b in range(2):
            ref_f, ref_g, _, _ = _reference(model, pen, theta[b], w[b])
            np.testing.assert_allclose(f[b], ref_f, rtol=1e-12)
            np.testing.assert_allclose(g[b], ref_g, rtol=1e-10, atol=1e-12 * np.abs(ref_g).max())
    pred = np.log(np.exp(np.einsum("knp,p->kn", model.design, theta[0])).sum(0))
    res = pred - model.target
    assert (res > 0.005).any() and (res < -0.005).any() and (np.abs(res) < 0.005).sum() > 10


@pytest.mark.parametrize("make", [_chinchilla, _frantar, _custom])
@pytest.mark.parametrize("space", ["log", "linear"])
@pytest.mark.parametrize("asym", [0.5, 0.7])
def test_passes_match_the_reference(make, space, asym):
    model = make(space=space)
    b, n = 120, model.target.shape[0]
    rng = np.random.default_rng(2)
    theta = _theta(make, b, rng)
    pen = Penalty(delta=1e-3 if space == "log" else 0.05, asymmetry=asym, space=space)
    ops = build_ops(model)
    w_rows = rng.uniform(0.0, 2.0, (b, n))
    f_old = rng.uniform(0.0, 1.0, b) * np.median(evaluate(ops, pen, theta, None)[0])
    exact = rng.random(b) < 0.5
    cases = [
        (None, None, None),
        (None, f_old, exact),
        (w_rows, None, exact),
        (w_rows[:1], f_old, None),
    ]
    for weights, fo, ex in cases:
        f, ok, g, h = evaluate(ops, pen, theta, weights, fo, ex)
        for i in range(b):
            wi = np.ones(n) if weights is None else weights[min(i, weights.shape[0] - 1)]
            ref_f, ref_g, irls, hess = _reference(model, pen, theta[i], wi)
            np.testing.assert_allclose(f[i], ref_f, rtol=1e-11)
            assert ok[i] == (fo is None or ref_f < fo[i])
            if not ok[i]:
                assert not g[i].any() and not h[i].any()
                continue
            scale = np.abs(ref_g).max() + 1e-300
            np.testing.assert_allclose(g[i] / scale, ref_g / scale, atol=1e-10)
            want = hess if ex is not None and ex[i] else irls
            # the exact log-space Hessian is rho'' J J^T + rho' (sum_k p_k M_k M_k^T - J J^T):
            # where one term dominates the bracket cancels, leaving ~1e-7 of the largest entry
            tol = 3e-6 if ex is not None and ex[i] and space == "log" else 1e-10
            assert np.abs(h[i] - want).max() <= tol * np.abs(want).max()
    assert 0 < ok.sum() < b  # the f_old case rejects some rows and accepts others


def test_damped_steps_match_numpy_solve_including_degenerate_systems():
    rng = np.random.default_rng(3)
    b, p = 200, 5
    a = rng.normal(size=(b, p, p))
    h = a @ a.transpose(0, 2, 1)
    h[:50] -= 3.0 * np.eye(p)  # indefinite rows (exact Hessians far from a minimum)
    g = rng.normal(size=(b, p))
    lam = 10.0 ** rng.uniform(-9, 3, b)
    h[60] = 0.0  # all-zero matrix: the 1e-12 floor on the damping keeps it solvable
    g[61, 2] = np.nan  # non-finite: zero step
    h[62, 1, 1] = np.inf
    got = damped_steps(h, g, lam)
    for i in set(range(b)) - {61, 62}:
        mat = h[i] + lam[i] * np.diag(np.abs(np.diag(h[i])) + 1e-12)
        np.testing.assert_allclose(got[i], np.linalg.solve(mat, -g[i]), rtol=1e-8, atol=1e-10)
    assert not got[61:63].any() and np.all(np.isfinite(got))
    np.testing.assert_allclose(got[60], -g[60] / (lam[60] * 1e-12), rtol=1e-12)


@pytest.mark.slow
def test_compiled_passes_cache_in_a_private_folder(tmp_path):
    """The solver's compiled code goes to $SPARSEJAX_CACHE_DIR (one variable for data and
    compiled code), in folders only the user can read; a folder others can write is refused."""
    import subprocess
    import sys

    code = ("import numpy as np; from scaling import fit_chinchilla; "
            "n = np.geomspace(1e6, 1e9, 8); d = np.geomspace(1e8, 1e11, 8); "
            "N, D = [a.ravel() for a in np.meshgrid(n, d)]; "
            "fit_chinchilla(N, D, 1.7 + 400 / N**0.34 + 400 / D**0.28, grid='coarse')")
    ok = tmp_path / "ok"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                   env={**os.environ, "SPARSEJAX_CACHE_DIR": str(ok)}, timeout=300)
    folders = sorted((ok / "kernels").iterdir())
    assert len(folders) == 2 and all((f.stat().st_mode & 0o777) == 0o700 for f in folders)
    assert all(any(f.rglob("*.nbi")) for f in folders)  # numba index files written there
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], check=True,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "SPARSEJAX_CACHE_DIR": str(shared)})
    assert "are not cached on disk" in out.stderr and "writable by group or others" in out.stderr
    assert not (shared / "kernels").exists() or not any((shared / "kernels").rglob("*.nbi"))
