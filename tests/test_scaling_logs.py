"""Sweep dirs, CSVs and DataFrames into fit tables, with clear errors."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from scaling import ChinchillaLaw, load_table

LAW = ChinchillaLaw(E=1.5, A=60.0, B=80.0, alpha=0.3, beta=0.25)


def _summary(n_params, density_avg, sparsity, tokens, status="completed", **extra):
    n_avg = n_params * density_avg
    rec = {
        "status": status,
        "step": tokens // 4096,
        "tokens": tokens,
        "train_loss": 3.0,
        "val_loss": float(LAW.predict(n_avg, tokens)),
        "n_params": n_params,
        "n_active": int(n_params * (1 - sparsity)),
        "n_avg": n_avg,
        "flops": 6.0 * n_avg * tokens,
        "sparsity": sparsity,
        "density": 1 - sparsity,
    }
    rec.update(extra)
    return rec


def _sweep(tmp_path, records):
    tmp_path.mkdir(exist_ok=True)
    for i, rec in enumerate(records):
        run = tmp_path / f"run{i:02d}"
        run.mkdir()
        (run / "summary.json").write_text(json.dumps(rec))
    (tmp_path / "sweep.json").write_text(json.dumps({"recipe": "x", "runs": []}))
    return tmp_path


def _records():
    out = []
    for n in (1e5, 4e5, 1.6e6):
        for t in (1e7, 4e7):
            out.append(_summary(n, 0.6, 0.75, int(t)))
    return out


def test_sweep_dir_rows_and_n_key(tmp_path):
    recs = _records()
    sweep = _sweep(tmp_path, recs)
    table = load_table(sweep)
    assert table.n_key == "n_avg" and len(table.names) == 6 and table.names[0] == "run00"
    np.testing.assert_allclose(table.N, [r["n_avg"] for r in recs])
    np.testing.assert_allclose(table.D, [r["tokens"] for r in recs])
    np.testing.assert_allclose(table.loss, [r["val_loss"] for r in recs])
    np.testing.assert_allclose(table.S, 0.75)
    for key in ("n_params", "n_active"):
        np.testing.assert_allclose(load_table(sweep, n_key=key).N, [r[key] for r in recs])
    with pytest.raises(ValueError, match="n_key"):
        load_table(sweep, n_key="n_total")


def test_unfinished_runs_are_skipped_with_a_warning(tmp_path):
    recs = _records() + [
        _summary(3e6, 0.6, 0.75, 10**7, status="running"),
        _summary(3e6, 0.6, 0.75, 10**7, status="failed"),
    ]
    sweep = _sweep(tmp_path, recs)
    with pytest.warns(UserWarning, match="skipped 2 run"):
        assert len(load_table(sweep).loss) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_table(sweep, statuses=("completed", "running", "failed")).loss) == 8


def test_diverged_runs_are_skipped_with_a_warning_naming_them(tmp_path):
    """The trainer's diverged summaries (status "diverged", loss stored as the string "nan"),
    a "diverged" flag and a completed run with a "nan" val_loss: none reaches the fit."""
    recs = _records() + _records()[:2]
    recs[6].update(status="diverged", val_loss="nan", train_loss="nan", diverged_step=120)
    recs[7].update(diverged=True, val_loss=9.0)
    recs[2]["val_loss"] = "nan"
    sweep = _sweep(tmp_path, recs)
    with pytest.warns(UserWarning, match="skipped 3 diverged run") as rec:
        table = load_table(sweep)
    message = str(rec[0].message)
    assert "run06 (step 120, val_loss nan)" in message and "run07" in message
    assert "run02" in message and "run00" not in message
    assert table.names == ("run00", "run01", "run03", "run04", "run05")
    np.testing.assert_allclose(table.loss, [recs[i]["val_loss"] for i in (0, 1, 3, 4, 5)])
    with pytest.warns(UserWarning, match="diverged"):  # skipped even when the status is asked
        assert len(load_table(sweep, statuses=("completed", "diverged")).loss) == 5
    only = _sweep(tmp_path / "only", [recs[6]])
    with pytest.warns(UserWarning, match="run00"), pytest.raises(ValueError, match="no run dir"):
        load_table(only)


def test_errors_name_the_problem(tmp_path):
    recs = _records()
    recs[2]["val_loss"] = None
    with pytest.raises(ValueError, match="run02.*val_loss"):
        load_table(_sweep(tmp_path / "a", recs))
    recs = _records()
    del recs[1]["tokens"]
    with pytest.raises(ValueError, match="run01: missing field 'tokens'"):
        load_table(_sweep(tmp_path / "b", recs))
    recs = _records()
    recs[3]["val_loss"] = -1.0
    with pytest.raises(ValueError, match=r"loss must be finite and > 0.*\(run run03\)"):
        load_table(_sweep(tmp_path / "c", recs))
    recs = _records()
    recs[0]["val_loss"] = "inf"  # how the trainer's writer stores inf: a diverged run
    with pytest.warns(UserWarning, match=r"skipped 1 diverged run\(s\): run00"):
        assert len(load_table(_sweep(tmp_path / "d", recs)).loss) == 5
    with pytest.raises(ValueError, match="free parameters"):
        load_table(_sweep(tmp_path / "e", _records()[:4]))
    same_n = [_summary(1e5, 0.6, 0.75, int(t)) for t in (1e7, 2e7, 4e7, 8e7, 1.6e8)]
    with pytest.raises(ValueError, match="N has a single distinct value"):
        load_table(_sweep(tmp_path / "f", same_n))
    with pytest.raises(ValueError, match="sweep dir"):
        load_table(tmp_path / "missing")
    (tmp_path / "g").mkdir()
    with pytest.raises(ValueError, match="no run dir"):
        load_table(tmp_path / "g")


def test_csv_and_dataframe(tmp_path, reference_data):
    pd = pytest.importorskip("pandas")
    table = load_table(reference_data / "chinchilla_svg_extracted.csv")
    assert table.loss.shape == (245,) and table.S is None and table.n_key == "N"
    df = pd.read_csv(reference_data / "chinchilla_svg_extracted.csv")
    np.testing.assert_array_equal(load_table(df).N, table.N)
    recs = pd.DataFrame(_records())
    from_df = load_table(recs, n_key="n_params")
    np.testing.assert_allclose(from_df.N, recs["n_params"])
    np.testing.assert_allclose(from_df.S, 0.75)
    path = tmp_path / "runs.csv"
    recs.to_csv(path, index=False)
    np.testing.assert_allclose(load_table(path).N, recs["n_avg"])
    with pytest.raises(ValueError, match="csv"):
        load_table(tmp_path / "runs.txt")
