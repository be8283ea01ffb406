"""The compiled (numba) solver passes against the numpy passes, which test_scaling_solver checks
against finite differences and an independent Gauss-Newton matrix."""

from __future__ import annotations

import numpy as np
import pytest

from scaling import fit_chinchilla, forms, fused
from scaling.passes import build_ops, evaluate
from scaling.solver import LSEModel, Penalty, _damped_steps, minimize


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
    offset) and non-unit columns on a term that is the same at every point."""
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


def _assert_same(a, b, exact):
    f0, ok0, g0, h0 = a
    f1, ok1, g1, h1 = b
    np.testing.assert_allclose(f1, f0, rtol=1e-12)
    np.testing.assert_array_equal(ok1, ok0)
    scale_g = np.abs(g0).max(axis=1, keepdims=True) + 1e-300
    np.testing.assert_allclose(g1 / scale_g, g0 / scale_g, atol=1e-11)
    rel = np.abs(h1 - h0).max(axis=(1, 2)) / (np.abs(h0).max(axis=(1, 2)) + 1e-300)
    exact = np.zeros(len(rel), bool) if exact is None else exact
    assert rel[~exact].max(initial=0) < 1e-10
    # the exact Hessian in log space is rho'' J J^T + rho' (sum_k p_k M_k M_k^T - J J^T): at
    # starts where one term dominates the bracket cancels, and both implementations keep ~1e-7
    # of the row's largest entry (checked against an 80-bit computation)
    assert rel[exact].max(initial=0) < 3e-6


@pytest.mark.parametrize("make", [_chinchilla, _frantar, _custom])
@pytest.mark.parametrize("space", ["log", "linear"])
@pytest.mark.parametrize("asym", [0.5, 0.7])
def test_fused_passes_match_numpy_passes(make, space, asym):
    model = make(space=space)
    b, n = 300, model.target.shape[0]
    p = model.design.shape[2]
    rng = np.random.default_rng(2)
    if make is _chinchilla:
        theta = rng.uniform([0, 0, -1, 0, 0], [25, 25, 1, 2, 2], (b, p))
    elif make is _custom:
        theta = rng.uniform(-1.0, 1.0, (b, p))
    else:
        theta = rng.uniform(-1.0, 3.0, (b, p)) * np.array([1, 0.5, 1, 0.3, 1, 0.3, 0.5])
    pen = Penalty(delta=1e-3 if space == "log" else 0.05, asymmetry=asym, space=space)
    ops, fops = build_ops(model), fused.build_fused_ops(model)
    w_rows = rng.uniform(0.0, 2.0, (b, n))
    f_old = rng.uniform(0.0, 1.0, b) * np.median(evaluate(model, ops, pen, theta, None)[0])
    exact = rng.random(b) < 0.5
    cases = [
        (None, None, None),
        (None, f_old, exact),
        (w_rows, None, exact),
        (w_rows[:1], f_old, None),
    ]
    for weights, fo, ex in cases:
        ref = evaluate(model, ops, pen, theta, weights, fo, ex)
        got = fused.evaluate_fused(fops, pen, theta, weights, fo, ex)
        _assert_same(ref, got, ex)
    assert 0 < got[1].sum() < b  # the f_old case rejects some rows and accepts others


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
    got = fused.damped_steps(h, g, lam)
    with np.errstate(invalid="ignore"):
        ref = _damped_steps(h, g, lam)
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10)
    assert not got[61:63].any() and np.all(np.isfinite(got))
    np.testing.assert_allclose(got[60], -g[60] / (lam[60] * 1e-12), rtol=1e-12)


def test_minimize_backends_reach_the_same_optimum():
    model = _chinchilla(seed=4)
    starts = forms.grid_starts(forms.CHINCHILLA, "coarse", np.ones(5, bool))
    ref = minimize(model, starts, backend="numpy")
    got = minimize(model, starts, backend="numba")
    assert got.objective.min() == pytest.approx(ref.objective.min(), rel=1e-9)
    best = np.argmin(got.objective)
    np.testing.assert_allclose(got.theta[best], ref.theta[np.argmin(ref.objective)], rtol=1e-4)


def test_fit_with_fixed_coefficient_matches_numpy_backend():
    rng = np.random.default_rng(5)
    N = np.exp(rng.uniform(np.log(1e7), np.log(1e10), 80))
    D = np.exp(rng.uniform(np.log(1e9), np.log(1e12), 80))
    loss = 1.7 + 400 / N**0.33 + 1500 / D**0.3
    kw = dict(grid="coarse", fixed={"alpha": 0.33})
    a = fit_chinchilla(N, D, loss, backend="numpy", **kw)
    b = fit_chinchilla(N, D, loss, backend="numba", **kw)
    assert b.objective == pytest.approx(a.objective, rel=1e-9, abs=1e-15)
    for k in ("E", "A", "B", "beta"):
        assert getattr(b, k) == pytest.approx(getattr(a, k), rel=1e-4)


def test_backend_is_validated():
    with pytest.raises(ValueError, match="backend must be"):
        fit_chinchilla([1e7, 1e8, 1e9] * 3, [1e9, 1e10, 1e11] * 3, [3.0, 2.5, 2.2] * 3, backend="x")
    with pytest.raises(ValueError, match="backend must be"):
        minimize(_chinchilla(), np.zeros((1, 5)), backend="cuda")


def _one_term_model():  # a tiny structure of its own, so compiling it here is quick
    x = np.linspace(1.0, 2.0, 20)
    design = np.zeros((1, 20, 1))
    design[0, :, 0] = -x
    return LSEModel(design, np.zeros((1, 20)), -0.7 * x)


def test_kernels_are_written_to_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fused, "_KERNELS", {})
    res = minimize(_one_term_model(), np.array([[0.1]]), backend="numba")
    assert res.theta[0, 0] == pytest.approx(0.7, rel=1e-6)
    files = list((tmp_path / "scaling_kernels").glob("kernel_*.py"))
    assert len(files) == 1 and "def kernel(" in files[0].read_text()


def test_unwritable_cache_dir_compiles_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    monkeypatch.setenv("SPARSEJAX_CACHE_DIR", str(blocker))
    monkeypatch.setattr(fused, "_KERNELS", {})
    res = minimize(_one_term_model(), np.array([[0.1]]), backend="numba")
    assert res.theta[0, 0] == pytest.approx(0.7, rel=1e-6)


def test_without_numba_auto_warns_and_numba_raises(monkeypatch):
    import sys

    model = _chinchilla(seed=6)
    starts = forms.grid_starts(forms.CHINCHILLA, "coarse", np.ones(5, bool))[:20]
    ref = minimize(model, starts, backend="numpy")
    import scaling

    monkeypatch.setitem(sys.modules, "scaling.fused", None)  # makes the import fail
    monkeypatch.delattr(scaling, "fused")
    with pytest.warns(RuntimeWarning, match="numba is unavailable"):
        got = minimize(model, starts, backend="auto")
    np.testing.assert_array_equal(got.objective, ref.objective)
    with pytest.raises(ImportError, match="backend='numba' needs numba"):
        minimize(model, starts, backend="numba")
