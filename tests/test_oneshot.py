"""One-shot pruning of a trained checkpoint (Jaiswal et al. 2023's essential-sparsity curve):
exact levels, the run's own eval at sparsity 0, the JSON record and plot, calibration scores,
N:M groups, the knee rule and the command line's errors."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from sparsejax import cli
from sparsejax import prunable as prunable_lib
from sparsejax import scores as scores_lib
from sparsejax.downstream import oneshot
from sparsejax.run import rundir


def _run_eval_loss(run_dir) -> float:
    return [r for r in rundir.read_metrics(run_dir) if r.get("val_loss") is not None][-1][
        "val_loss"]


@pytest.fixture(scope="module")
def magnitude_result(finished_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("oneshot") / "oneshot.json"
    result = oneshot.oneshot(finished_run, [0.0, 0.25, 0.5, 0.75, 0.1], out=out, log=None)
    return result, out


@pytest.mark.slow
def test_sparsity_zero_is_the_runs_own_eval_loss(finished_run, magnitude_result):
    """At the run's eval.final_batches (the tiny config's eval.batches too) the baseline (the
    dense run's own model) and sparsity 0 are the run's final evaluation: same loss, SE,
    sequences and token fingerprint as summary.json."""
    result, _ = magnitude_result
    want = _run_eval_loss(finished_run)
    summary = rundir.read_json(finished_run / "summary.json")
    config = rundir.read_json(finished_run / "config.json")
    assert result["eval"]["batches"] == config["eval"]["final_batches"]
    assert result["step"] == 8
    assert result["baseline_val_loss"] == pytest.approx(want, rel=1e-6)
    assert result["baseline"]["sparsity"] == 0.0
    assert result["baseline"]["label"] == "the run's own model (dense)"
    assert result["levels"][0]["sparsity"] == 0.0
    for point in (result["baseline"], result["levels"][0]):
        assert point["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
        assert point["val_loss_se"] == pytest.approx(summary["val_loss_se"], rel=1e-5)
        assert point["eval_sequences"] == summary["eval_sequences"]
        assert point["eval_sha256"] == summary["eval_sha256"]


@pytest.mark.slow
def test_measured_sparsity_is_exact(magnitude_result):
    result, _ = magnitude_result
    n = result["n_prunable"]
    assert n == 2 * (4 * 64 * 64 + 2 * 64 * 256)  # tiny: attention and MLP kernels only
    assert [lv["sparsity"] for lv in result["levels"]] == [0.0, 0.1, 0.25, 0.5, 0.75]
    for lv in result["levels"]:
        assert lv["n_pruned"] == round(lv["sparsity"] * n)
        assert lv["measured_sparsity"] == lv["n_pruned"] / n
    assert [lv["measured_sparsity"] for lv in result["levels"] if lv["sparsity"] != 0.1] == [
        0.0, 0.25, 0.5, 0.75]


@pytest.mark.slow
def test_json_fields_knee_and_plot(magnitude_result):
    result, out = magnitude_result
    saved = json.loads(out.read_text())
    assert saved["levels"] == result["levels"]
    for key in ("run_dir", "step", "score", "structure", "allocation", "n_prunable", "eval",
                "baseline_val_loss", "unit", "tolerance", "tolerance_rule", "knee", "levels"):
        assert key in saved, key
    assert saved["score"] == "magnitude" and saved["structure"] == "unstructured"
    assert saved["allocation"] == "global" and saved["tolerance"] == 0.01
    assert saved["eval"] == {"split": "val", "batches": 1, "batch_size": 4, "seq_len": 32,
                             "seed": 0}
    assert saved["unit"] == "nats/byte"  # the built-in corpus: bytes
    for point in (saved["baseline"], *saved["levels"]):
        assert set(point) >= {"val_loss", "val_loss_se", "eval_sequences", "eval_sha256"}
        assert math.isfinite(point["val_loss_se"]) and point["val_loss_se"] > 0
        assert point["eval_sequences"] == 4 and point["eval_sha256"] == saved["baseline"][
            "eval_sha256"]
    assert saved["baseline"]["val_loss"] == saved["baseline_val_loss"]
    for lv in saved["levels"]:
        assert set(lv) >= {"sparsity", "measured_sparsity", "score", "structure", "val_loss"}
    text = oneshot.table(saved)
    assert text.count(" ± ") == 2 + len(saved["levels"])  # the header, baseline, each level
    assert f"{saved['baseline_val_loss']:.4f} ± {saved['baseline']['val_loss_se']:.4f}" in text
    bound = saved["baseline_val_loss"] * 1.01
    # sparsity 0 prunes no weight the dense run kept: the baseline again, never the knee
    assert [lv["newly_pruned"] > 0 for lv in saved["levels"]] == [False, True, True, True, True]
    within = [lv["sparsity"] for lv in saved["levels"] if lv["val_loss"] <= bound
              and lv["newly_pruned"] > 0]
    assert saved["knee"]["sparsity"] == max(within)
    png = out.with_suffix(".png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_knee_rule():
    assert oneshot.knee([0.1, 0.5, 0.9], [2.0, 2.0199, 2.5], 2.0, 0.01) == 0.5
    assert oneshot.knee([0.1, 0.5], [2.03, 2.5], 2.0, 0.01) is None
    assert oneshot.knee([0.2, 0.4, 0.6], [2.0, 2.05, 2.01], 2.0, 0.01) == 0.6  # largest within
    assert oneshot.knee([0.3], [float("nan")], 2.0, 0.01) is None


@pytest.mark.slow
@pytest.mark.parametrize("score", ["wanda", "gblm"])
def test_calibration_scores_run(finished_run, tmp_path, score):
    result = oneshot.oneshot(finished_run, [0.5], score=score, out=tmp_path / "o.json",
                             calibration_batches=1, plot=False, log=None)
    assert result["score"] == score and result["allocation"] == "layerwise"
    assert result["calibration"]["split"] == "train" and result["calibration"]["batches"] == 1
    (lv,) = result["levels"]
    assert lv["measured_sparsity"] == 0.5 and math.isfinite(lv["val_loss"])
    assert not (tmp_path / "o.png").exists()


@pytest.mark.slow
def test_two_four_keeps_two_of_every_four_along_the_input_axis(finished_run, tmp_path):
    loaded = oneshot.load_run(finished_run)
    prunable = prunable_lib.prunable_tree(loaded.params)
    pruned, mask = oneshot.prune(loaded.params, scores_lib.magnitude(loaded.params), 0.0,
                                 prunable, structure="2:4")
    checked = 0
    for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]:
        if np.ndim(m) == 2:
            groups = np.asarray(m).reshape(-1, 4, m.shape[1]).sum(axis=1)
            assert (groups == 2).all(), prunable_lib.path_str(path)
            checked += 1
    assert checked == 12
    result = oneshot.oneshot(finished_run, [0.1, 0.9], structure="2:4", out=tmp_path / "o.json",
                             plot=False, log=None)
    assert [lv["sparsity"] for lv in result["levels"]] == [0.5]
    assert result["levels"][0]["measured_sparsity"] == 0.5


@pytest.mark.slow
def test_block_structure_prunes_whole_tiles(finished_run, tmp_path):
    loaded = oneshot.load_run(finished_run)
    prunable = prunable_lib.prunable_tree(loaded.params)
    _, mask = oneshot.prune(loaded.params, scores_lib.magnitude(loaded.params), 0.5, prunable,
                            structure="block", block=(16, 16))
    m = np.asarray(mask["blocks"][0]["mlp"]["fc_in"]["kernel"])
    tiles = m.reshape(4, 16, 16, 16).transpose(0, 2, 1, 3).reshape(64, 256)
    assert set(tiles.mean(axis=1)) <= {0.0, 1.0} and m.mean() == 0.5


@pytest.mark.slow
def test_cli_runs_and_reports_the_knee(finished_run, tmp_path, capsys):
    out = tmp_path / "cli.json"
    assert cli.main(["oneshot", str(finished_run), "--sparsities", "0.5,0.25",
                     "--tolerance", "0.02", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sparsity 0.250" in text and "sparsity 0.500" in text
    assert text.count(" ± ") == 3  # the baseline and both levels: loss ± SE
    assert "within 2% (relative) of the run's own model (dense)" in text
    assert text.count("nats/byte") == 4  # the baseline, both levels, the knee
    saved = json.loads(out.read_text())
    assert saved["tolerance"] == 0.02 and out.with_suffix(".png").is_file()


def _one_error(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsejax: error: ")
    return err[0]


@pytest.mark.parametrize("extra, expected", [
    (["--sparsities", "0.1,1.5"], ["--sparsities", "[0, 1]", "1.5"]),
    (["--sparsities", "0.1,abc"], ["--sparsities", "'abc'"]),
    (["--structure", "4:2"], ["structure", "'4:2'"]),
    (["--structure", "dense"], ["structure", "'N:M'"]),
    (["--score", "snip"], ["--score", "invalid choice"]),
    (["--block", "16"], ["--block", "BK,BN"]),
    (["--eval-batches", "0"], ["--eval-batches", ">= 1"]),
    (["--tolerance", "-0.1"], ["tolerance", ">= 0"]),
    (["--step", "3"], ["no checkpoint at step 3", "[2, 4, 6, 8]"]),
])
@pytest.mark.slow
def test_cli_bad_values(capsys, finished_run, extra, expected):
    line = _one_error(capsys, ["oneshot", str(finished_run), *extra])
    for piece in expected:
        assert piece in line, line


def test_cli_bad_run_dirs(capsys, tmp_path):
    line = _one_error(capsys, ["oneshot", str(tmp_path / "missing")])
    assert "run dir" in line and "does not exist" in line
    line = _one_error(capsys, ["oneshot", str(tmp_path)])
    assert "config.json" in line
    (tmp_path / "config.json").write_text("{}")
    line = _one_error(capsys, ["oneshot", str(tmp_path)])
    assert "no checkpoint" in line


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["oneshot", "--help"])
    assert e.value.code == 0
    assert "--sparsities" in capsys.readouterr().out
