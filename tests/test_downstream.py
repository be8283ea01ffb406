"""Downstream (issue 16): load a run as a model, fine-tune from a config (sparse, dense,
SquareHead), export that reloads, sparse model soups. The fast tests come first (hand-made
params, the soup's greedy rule on faked training and evaluation); the slow ones share one tiny
static-sparse pre-training run (module scope), with ``finished_run`` (dense) as the SquareHead
teacher. SquareHead's loss by hand: tests/test_distill.py."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import one_error_line, tiny_config
from flax import nnx

import sparsejax
from sparsejax import cli
from sparsejax.downstream import loading, oneshot, soup
from sparsejax.models.gpt import GPT
from sparsejax.prunable import prunable_tree
from sparsejax.run import build, checkpoint, configlib, data, evaluation, experiment, rundir
from sparsejax.run.train import TrainState

FT_STEPS = 2  # warm-up 1: step 0 runs at lr 0, step 1 moves every trainable weight


# --- fast: no trained run (hand-made params, fakes) ----------------------------------------


def test_align_names_every_mismatching_leaf():
    like = {"blocks": {0: {"kernel": np.zeros((2, 3))}}, "embed": np.zeros(4)}
    raw = {"blocks": {"0": {"kernel": np.zeros((3, 2))}}, "extra": np.zeros(1)}
    with pytest.raises(ValueError) as e:
        loading.align(raw, like, "params")
    msg = str(e.value)
    assert "blocks/0/kernel: shape (3, 2), the model has (2, 3)" in msg
    assert "embed: missing" in msg and "extra: not in the model" in msg
    fixed = loading.align({"blocks": {"0": {"kernel": np.ones((2, 3))}}, "embed": np.ones(4)},
                          like, "params")
    assert jax.tree_util.tree_structure(fixed) == jax.tree_util.tree_structure(like)


def test_stdlib_tests_source_is_the_excluded_domain():
    root = data.stdlib_root()
    tests = data.stdlib_test_files(root)
    assert tests and all({"test", "tests"} & set(r.split("/")[:-1]) for r in tests)
    assert not set(tests) & set(data.stdlib_files(root))
    assert configlib.apply_arg(configlib.base(), "data.source=stdlib-tests").data.source


def test_greedy_soup_acceptance_rule_on_hand_made_losses(tmp_path, monkeypatch):
    """The greedy soup (Wortsman et al. 2022) through ``soup.soup`` with the training, loading
    and evaluation faked: five one-weight ingredients whose losses, and those of every soup
    the rule can try, are set by hand. Ranked by loss, a candidate joins when the soup with it
    scores <= the best soup so far: a soup landing between the best and the second-best
    ingredient is rejected, a tie joins, and after an improvement the bar is the new best
    soup, not the best ingredient."""
    weight = [30.0, 0.0, 200.0, 10.0, 90.0]  # ingredient i's kept weight
    loss_at = {  # the loss of params whose kept weight is w (a soup: its members' mean)
        0.0: 1.0, 10.0: 2.0, 30.0: 3.0, 90.0: 4.0, 200.0: 5.0,  # the ingredients
        5.0: 1.5,    # {0, 10}: between the best (1.0) and the second best (2.0): rejected
        15.0: 1.0,   # {0, 30}: ties the best: joins
        40.0: 0.9,   # {0, 30, 90}: better: joins
        80.0: 0.95,  # {0, 30, 90, 200}: above the soup's 0.9, below the best ingredient's 1.0
        66.0: 2.5,   # all five: the uniform soup
    }
    config = tiny_config(init_from=str(tmp_path / "start"), soup__ingredients=5)

    class FakeEvaluator:
        def __init__(self, model, spec, corpus):
            pass

        def __call__(self, params):
            w = float(params["w"][0, 0])
            assert params["w"][0, 1] == 0 and w in loss_at, f"unexpected soup, weight {w}"
            return evaluation.EvalResult(loss_at[w], 0.01, 8, "fake")

    def fake_load(run_dir, **kw):
        i = int(Path(run_dir).name.removeprefix("ingredient"))
        params = {"w": np.asarray([[weight[i], 0.0]], np.float32)}
        return loading.Loaded(None, params, {"w": np.asarray([[True, False]])}, None, 0)

    written = {}
    monkeypatch.setattr(experiment, "check", lambda c: None)
    monkeypatch.setattr(experiment, "run", lambda c, d, progress=False: {})
    monkeypatch.setattr(data, "load_spec", lambda spec: None)
    monkeypatch.setattr(loading, "load", fake_load)
    monkeypatch.setattr(loading, "read_config", lambda run_dir: config)
    monkeypatch.setattr(soup, "Evaluator", FakeEvaluator)
    monkeypatch.setattr(soup, "_write_soup", lambda d, c, params, masks, summary: written.update(
        {Path(d).name: (float(params["w"][0, 0]), summary)}))
    (cycle,) = soup.soup(config, tmp_path / "soup")["cycles"]
    ing = [str(tmp_path / "soup" / "cycle0" / f"ingredient{i}") for i in range(5)]
    assert cycle["best_ingredient"] == 1.0
    assert cycle["greedy"]["members"] == [ing[1], ing[0], ing[4]]
    assert cycle["greedy"]["val_loss"] == 0.9 and written["greedy"][0] == 40.0
    assert cycle["uniform"]["val_loss"] == 2.5 and written["uniform"][0] == 66.0
    assert cycle["uniform"]["members"] == ing


def test_prune_more_removes_the_smallest_kept_weights():
    params = {"a": np.asarray([[0.0, 3.0], [-1.0, 2.0]], np.float32), "b": np.float32(7)}
    masks = {"a": np.asarray([[False, True], [True, True]]), "b": np.bool_(True)}
    p, m = soup.prune_more(params, masks, 1 / 3)  # 1 of the 3 kept: |-1| goes
    np.testing.assert_array_equal(m["a"], [[False, True], [False, True]])
    np.testing.assert_array_equal(p["a"], [[0.0, 3.0], [0.0, 2.0]])
    assert soup.mask_sparsity(m) == 0.5 and p["b"] == 7


# --- slow: a tiny pre-training run (module fixture) and fine-tunes of it ---------------------


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    """8 steps of static magnitude pruning at 50% (unstructured), one checkpoint."""
    run_dir = tmp_path_factory.mktemp("downstream") / "sparse"
    c = tiny_config(sparsity__method="static", sparsity__final=0.5, checkpoint__every=8)
    experiment.run(c, str(run_dir), progress=False)
    return run_dir


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32)), jnp.int32)


def _restored_training_state(run_dir):
    """The run's training state restored into the structure training builds (orbax's
    structured restore, independent of ``sparsejax.load``): the model computing with the
    forward weights the training loop evaluated, and the state."""
    config = loading.read_config(run_dir)
    tx = experiment.check(config).tx
    cfg = build.model_config(config, vocab_size=256)  # the byte corpus
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(config.seed)))
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(state)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    like = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params),
                      jax.ShapeDtypeStruct((2,), jnp.uint32), scalar, scalar, scalar,
                      jax.ShapeDtypeStruct((), jnp.int32))
    restored, _ = checkpoint.restore_newest(run_dir, like)
    restored = TrainState(*restored)
    nnx.replace_by_pure_dict(state, sparsejax.forward_params(restored.params, restored.opt_state))
    return nnx.merge(graphdef, state, rest), restored


@pytest.mark.slow
def test_load_round_trip(sparse_run, tokens):
    loaded = sparsejax.load(sparse_run)
    model, restored = _restored_training_state(sparse_run)
    np.testing.assert_array_equal(np.asarray(loaded.model(tokens)), np.asarray(model(tokens)))
    train_masks = sparsejax.masks_of(restored.opt_state)
    # same tree (dict key types included: int block indices, not '0', '1'), same values
    assert (jax.tree_util.tree_structure(loaded.masks)
            == jax.tree_util.tree_structure(train_masks)
            == jax.tree_util.tree_structure(loaded.params))
    assert list(loaded.masks["blocks"]) == list(loaded.params["blocks"]) == [0, 1]
    for a, b in zip(jax.tree_util.tree_leaves(loaded.masks),
                    jax.tree_util.tree_leaves(train_masks), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert soup.mask_sparsity(loaded.masks) == pytest.approx(0.5, abs=1e-3)
    assert loaded.step == 8 and loaded.config.sparsity.method == "static"
    # the run's own final evaluation, recomputed on the loaded model: on the eval.seed set,
    # whatever the run's seed (a soup's ingredients differ in it)
    summary = json.loads((sparse_run / "summary.json").read_text())
    corpus = data.load_corpus(None, val_fraction=loaded.config.data.val_fraction)
    config = loaded.config.replace(seed=7)
    val = soup.Evaluator(loaded.model, config, corpus)(loaded.params)
    assert val.loss == pytest.approx(summary["val_loss"], rel=1e-6)
    assert val.se == pytest.approx(summary["val_loss_se"], rel=1e-5)
    assert (val.n_sequences, val.sha256) == (summary["eval_sequences"], summary["eval_sha256"])
    assert sparsejax.load(sparse_run, dense=True).masks is None


@pytest.mark.slow
def test_dense_squarehead_finetune_frees_the_zeros(sparse_run, finished_run, tmp_path):
    """SPDF's dense fine-tuning with SquareHead from the dense teacher ``finished_run``: the
    pruned weights start at 0 and train (the sparse mode, which keeps them, is the soup's)."""
    pre = sparsejax.load(sparse_run)
    c = tiny_config(init_from=str(sparse_run), finetune__mode="dense",
                    finetune__distill="squarehead", finetune__teacher=str(finished_run),
                    checkpoint__every=FT_STEPS)
    c.train.steps = c.eval.every = FT_STEPS
    assert experiment.run(c, str(tmp_path / "dense"), progress=False)["status"] == "completed"
    dense = sparsejax.load(tmp_path / "dense")
    assert dense.masks is None  # no masks left
    for m0, pd in zip(jax.tree_util.tree_leaves(pre.masks),
                      jax.tree_util.tree_leaves(dense.params), strict=True):
        if np.ndim(m0):
            pruned = ~np.asarray(m0)
            assert pruned.sum() and np.count_nonzero(np.asarray(pd)[pruned]) > 0.9 * pruned.sum()
    # SquareHead's objective (CE + KL + feature terms) is the logged train loss; the
    # validation loss stays the cross-entropy
    metrics = rundir.read_metrics(tmp_path / "dense")
    assert metrics[-1]["train_loss"] > metrics[-1]["val_loss"] + 0.1


@pytest.mark.slow
def test_finetune_config_errors(sparse_run, finished_run, tmp_path):
    def error(**overrides):
        with pytest.raises(ValueError) as e:
            experiment.check(tiny_config(**overrides))
        return str(e.value)

    assert "init_from" in error(init_from=str(tmp_path / "missing"))
    assert "sparsity.method" in error(init_from=str(sparse_run), sparsity__method="static",
                                      sparsity__final=0.5)
    assert "model.size" in error(init_from=str(sparse_run), model__size="XS")
    assert "init_from_step" in error(init_from_step=-2)
    assert "no checkpoint at step 3" in error(init_from=str(sparse_run), init_from_step=3)
    assert "finetune.teacher" in error(finetune__distill="squarehead")
    assert "finetune.mode" in error(finetune__mode="frozen")
    assert "finetune.temperature" in error(finetune__temperature=0.0)
    c = tiny_config(init_from=str(finished_run), finetune__mode="sparse")
    with pytest.raises(ValueError, match="holds no masks"):
        experiment.build(c)


@pytest.mark.slow
def test_oneshot_of_a_sparse_run_is_relative_to_its_own_model(sparse_run, tmp_path):
    """One-shot pruning of a 50%-sparse run: the baseline is the run's own model at sparsity
    0.5 (never "dense"), levels at or below it prune no weight it kept (the baseline again,
    never the knee), the knee is read among the levels beyond it, and the plot's loss axis
    says the unit the printed lines say."""
    lines: list[str] = []
    result = oneshot.oneshot(sparse_run, [0.25, 0.5, 0.75], out=tmp_path / "o.json",
                             plot=False, log=lines.append)
    base = result["baseline"]
    assert base["sparsity"] == pytest.approx(0.5, abs=1e-3) and base["n_zero"] > 0
    assert base["label"] == f"the run's own model at sparsity {base['sparsity']:.3f}"
    text = "\n".join(lines)
    assert "dense" not in text and "the run's own model at sparsity 0.500" in text
    newly = [lv["newly_pruned"] for lv in result["levels"]]
    assert newly[0] == newly[1] == 0 and newly[2] > 0  # 0.25, 0.5: only the run's zeros
    assert [lv["val_loss"] for lv in result["levels"][:2]] == [base["val_loss"]] * 2
    bound = result["baseline_val_loss"] * 1.01
    beyond = result["levels"][2]
    if beyond["val_loss"] <= bound:
        assert result["knee"]["sparsity"] == 0.75
        assert result["knee"]["removed_of_kept"] == pytest.approx(0.5, abs=2e-3)
    else:
        assert result["knee"] is None
    assert result["unit"] == "nats/byte" and text.count("nats/byte") == 5
    ax = oneshot.curves_figure([result]).axes[0]
    assert ax.get_ylabel() == "validation loss (nats/byte)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0].startswith("the run's own model at sparsity 0.500")
    assert not any(t.startswith("dense") for t in legend)


@pytest.mark.slow
def test_a_run_written_before_newer_model_keys_loads_and_fine_tunes(sparse_run, tokens,
                                                                     tmp_path):
    """A run dir whose config.json predates ``model.sparse_ift`` (older sparsejax) loads with
    the key at its default (no Sparse-IFT: what that run built) and passes the fine-tuning
    check, instead of failing on the missing key."""
    old = tmp_path / "old"
    shutil.copytree(sparse_run, old)
    stored = json.loads((old / "config.json").read_text())
    del stored["model"]["sparse_ift"]
    (old / "config.json").write_text(json.dumps(stored))
    loaded, ref = sparsejax.load(old), sparsejax.load(sparse_run)
    assert loaded.config.model.sparse_ift.family == ""
    np.testing.assert_array_equal(loaded.model(tokens), ref.model(tokens))
    experiment.check(tiny_config(init_from=str(old)))  # model keys equal: no error


def _pruned_run(src, dst, masks):
    """A run dir holding ``src``'s weights pruned by ``masks`` (weights-and-masks checkpoint)."""
    loaded = sparsejax.load(src)
    masks = jax.tree_util.tree_map(np.asarray, masks)
    params = jax.tree_util.tree_map(lambda p, m: np.where(m, p, 0).astype(p.dtype),
                                    loaded.params, masks)
    dst.mkdir(parents=True)
    rundir.write_json(dst / "config.json", loaded.config.to_dict())
    checkpoint.save_weights(dst, 0, params, masks)
    return sparsejax.load(dst)


def _nm_mask(w):
    """2:4 along axis 0: the two largest |w| of every 4 consecutive rows, per column."""
    g = w.reshape(w.shape[0] // 4, 4, w.shape[1])
    keep = np.zeros(g.shape, bool)
    np.put_along_axis(keep, np.argsort(-g, axis=1, kind="stable")[:, :2], True, axis=1)
    return keep.reshape(w.shape)


def _block_mask(w):
    """The 25% of the 16x16 tiles with the largest L2 norm."""
    norms = np.sqrt((w.reshape(w.shape[0] // 16, 16, w.shape[1] // 16, 16) ** 2).sum((1, 3)))
    keep = norms >= np.sort(norms.ravel())[-norms.size // 4]
    return np.repeat(np.repeat(keep, 16, 0), 16, 1)


def _safetensors_header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert n % 8 == 0 and len(raw) == 8 + n + max(v["data_offsets"][1] for k, v in
                                                  header.items() if k != "__metadata__")
    return header


@pytest.mark.slow
def test_export_load_export_logits_equal(sparse_run, tokens, tmp_path, capsys):
    """N:M-pruned and block-pruned copies of the run (weights-and-masks checkpoints) export
    and load back: bsr and nm layouts, npz and safetensors files."""
    base = sparsejax.load(sparse_run)
    prunable = prunable_tree(base.params)
    on_prunable = lambda fn: jax.tree_util.tree_map(  # noqa: E731
        lambda p, pr: fn(np.abs(np.asarray(p))) if pr else np.bool_(True), base.params, prunable)
    nm_run = _pruned_run(sparse_run, tmp_path / "nm", on_prunable(_nm_mask))
    block_run = _pruned_run(sparse_run, tmp_path / "block", on_prunable(_block_mask))
    cases = [(nm_run, tmp_path / "nm", ["--format", "nm"], "export_nm.npz", "NMLinear"),
             (block_run, tmp_path / "block", ["--format", "safetensors", "--block", "16,16"],
              "model.safetensors", "BSRLinear")]
    for run, run_dir, args, name, layer in cases:
        capsys.readouterr()
        assert cli.main(["export", str(run_dir), *args]) == 0
        ratio = re.search(r"([0-9.]+)x the dense size", capsys.readouterr().out)
        assert ratio and float(ratio.group(1)) < 0.75
        ref = np.asarray(run.model(tokens))
        path = run_dir / "export" / name
        exact = sparsejax.load_export(path, kernels=False)  # decompressed: bit for bit
        np.testing.assert_array_equal(np.asarray(exact(tokens)), ref)
        fast = sparsejax.load_export(path)  # on the sparse layers
        assert type(fast.blocks[1].mlp.fc_in).__name__ == layer
        np.testing.assert_allclose(np.asarray(fast(tokens)), ref, rtol=1e-5, atol=1e-5)
    header = _safetensors_header(tmp_path / "block" / "export" / "model.safetensors")
    meta = json.loads(header["__metadata__"]["sparsejax"])
    assert meta["model"]["n_layer"] == 2
    assert meta["layout"]["blocks/0/mlp/fc_in/kernel"]["kind"] == "bsr"
    # only the non-zero 16x16 blocks: 25% of the 4x16 grid of a 64x256 kernel
    assert header["blocks.0.mlp.fc_in.kernel.values"]["shape"] == [16, 16, 16]
    assert header["blocks.0.mlp.fc_in.kernel.rows"]["dtype"] == "I32"


@pytest.mark.slow
def test_export_refuses_an_unstructured_run(sparse_run, capsys):
    for fmt, words in (("bsr", ("refused", "saves", "10%", "block masks", "N:M")),
                       ("nm", ("refused", "blocks/", "not 2:4 sparse", "sparsity.method=nm"))):
        capsys.readouterr()
        assert cli.main(["export", str(sparse_run), "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("sparsejax: error:")
        assert all(w in err for w in words), err
    assert not (sparse_run / "export").exists()


@pytest.mark.slow
def test_soup_keeps_the_mask_and_greedy_is_never_worse(sparse_run, tmp_path):
    """Two sparse fine-tunes (init_from, finetune.mode='sparse') of the run and their soups."""
    c = tiny_config(init_from=str(sparse_run), soup__ingredients=2, checkpoint__every=FT_STEPS)
    c.train.steps = c.eval.every = FT_STEPS
    result = soup.soup(c, tmp_path / "soup")
    cycle = result["cycles"][0]
    pre = sparsejax.load(sparse_run)
    ingredients = [sparsejax.load(i["run_dir"]) for i in cycle["ingredients"]]
    uniform = sparsejax.load(cycle["uniform"]["run_dir"])
    greedy = sparsejax.load(cycle["greedy"]["run_dir"])
    for ld in (*ingredients, uniform, greedy):
        assert soup.mask_sparsity(ld.masks) == soup.mask_sparsity(pre.masks) == cycle["sparsity"]
        for p0, m0, m, p in zip(*(jax.tree_util.tree_leaves(t) for t in (
                pre.params, pre.masks, ld.masks, ld.params)), strict=True):
            np.testing.assert_array_equal(m, m0)  # the sparse fine-tune kept the mask
            if np.ndim(m0):
                pruned = ~np.asarray(m0)
                assert np.all(np.asarray(p)[pruned] == 0)  # every zero in place
                assert np.any(np.asarray(p)[~pruned] != np.asarray(p0)[~pruned])  # trained
    for u, a, b in zip(*(jax.tree_util.tree_leaves(x.params) for x in
                         (uniform, *ingredients)), strict=True):
        np.testing.assert_allclose(np.asarray(u), (np.asarray(a, np.float64)
                                                   + np.asarray(b, np.float64)) / 2, rtol=1e-6,
                                   atol=1e-7)
    first = min(cycle["ingredients"], key=lambda i: i["val_loss"])
    assert cycle["best_ingredient"] == first["val_loss"]
    assert cycle["greedy"]["members"][0] == first["run_dir"]
    assert cycle["greedy"]["val_loss"] <= first["val_loss"]
    # every point: loss ± SE, sequences and fingerprint of the runs' final evaluation set
    saved = json.loads((tmp_path / "soup" / "soup.json").read_text())["cycles"][0]
    assert saved["ingredients"] == cycle["ingredients"]
    for point in (*saved["ingredients"], saved["uniform"], saved["greedy"]):
        assert math.isfinite(point["val_loss_se"]) and point["val_loss_se"] > 0
        assert point["eval_sequences"] == c.eval.final_batches * c.eval.batch_size
    for ing in saved["ingredients"]:  # scored again here: the ingredient run's own result
        own = json.loads((Path(ing["run_dir"]) / "summary.json").read_text())
        assert ing["eval_sha256"] == own["eval_sha256"]
        assert ing["val_loss"] == pytest.approx(own["val_loss"], rel=1e-6)
    for name in ("uniform", "greedy"):
        own = json.loads((Path(saved[name]["run_dir"]) / "summary.json").read_text())
        fields = ("val_loss", "val_loss_se", "eval_sequences", "eval_sha256")
        assert {k: own[k] for k in fields} == {k: saved[name][k] for k in fields}
        assert saved[name]["eval_sha256"] == saved["ingredients"][0]["eval_sha256"]
    assert soup.table(result).count(" ± ") == 1 + 2 + 3  # header, 2 ingredients, 3 rows


# ---- verified loading, sweep dirs, dense export (issues 24 and 26) ------------------------


def _flip_checkpoint_bit(step_dir: Path) -> None:
    """Flip one bit of the largest array file of a checkpoint step, at the first place from its
    middle where orbax still reads the step: the values change silently, so only the SHA-256
    recorded at save can tell. (Where the flip lands depends on the saved values; most flips in
    a compressed chunk make the read itself fail, which ``load`` reports as "cannot be read".)"""
    import orbax.checkpoint as ocp

    def read():
        return jax.tree_util.tree_leaves(ocp.StandardCheckpointer().restore(step_dir / "default"))

    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    f = max(files, key=lambda p: p.stat().st_size)
    data, before = f.read_bytes(), read()
    for at in range(len(data) // 2, len(data), 61):
        b = bytearray(data)
        b[at] ^= 0x04
        f.write_bytes(bytes(b))
        try:
            after = read()
        except Exception:  # noqa: BLE001 - any read failure: try the next place
            continue
        if any(not np.array_equal(x, y) for x, y in zip(before, after, strict=True)):
            return
    raise AssertionError(f"no bit flip in the second half of {f} reads back changed values")


def test_load_refuses_a_bit_flipped_checkpoint(finished_run, tmp_path, capsys):
    """``sparsejax.load`` (and so export, one-shot and ``init_from``) checks the SHA-256 each
    save records: a flipped bit is refused naming the run dir, the step and the steps left;
    an earlier step of the same run dir and the intact run load."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    _flip_checkpoint_bit(run / "checkpoints" / "8")
    msg = f"run dir {run}: checkpoint 8 does not match the SHA-256 recorded when it was saved"
    with pytest.raises(checkpoint.DamagedCheckpoint, match=re.escape(msg)) as e:
        sparsejax.load(run)
    assert "step=N (it has [2, 4, 6])" in str(e.value)
    with pytest.raises(checkpoint.DamagedCheckpoint, match=re.escape(msg)):
        checkpoint.load_raw(run, 8)
    assert sparsejax.load(run, step=6).step == 6
    assert sparsejax.load(finished_run).step == 8
    line = one_error_line(capsys, ["export", str(run), "--format", "safetensors",
                                    "--layout", "dense"])
    assert msg in line
    assert not (run / "export").exists()
    # damaged step metadata stops orbax listing every step: named, with the fix
    meta = next((run / "checkpoints" / "8").glob("_CHECKPOINT_METADATA"))
    meta.write_text(meta.read_text().replace('"item_handlers"', '"item_handlerz"'))
    with pytest.raises(checkpoint.DamagedCheckpoint, match=re.escape(
            f"run dir {run}: its checkpoints cannot be listed (ValueError: ")) as e:
        sparsejax.load(run, step=6)
    assert str(e.value).endswith(f"move the damaged step folder out of {run / 'checkpoints'}")
    # train's resume reads the same listing: the same one line (it was a raw orbax error)
    with pytest.raises(checkpoint.DamagedCheckpoint, match="its checkpoints cannot be listed"):
        checkpoint.restore_newest(run, None)


def test_load_of_a_sweep_dir_names_one_of_its_runs(finished_run, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    (sweep / "size=tiny").mkdir(parents=True)
    shutil.copy(finished_run / rundir.RunDir.CONFIG, sweep / "size=tiny")
    (sweep / rundir.SweepDir.SWEEP).write_text("{}")
    want = (f"run dir {sweep} is a sweep dir, not a run dir: give one of its run dirs instead "
            f"(e.g. {sweep / 'size=tiny'}, 1 in all; `sparsejax status {sweep}` lists them)")
    with pytest.raises(sparsejax.errors.InputError) as e:
        sparsejax.load(sweep)
    assert str(e.value) == want
    assert one_error_line(capsys, ["export", str(sweep), "--format", "npz"]) == (
        "sparsejax: error: export: " + want)
    assert one_error_line(capsys, ["oneshot", str(sweep)]) == "sparsejax: error: " + want
    (sweep / rundir.SweepDir.SWEEP).unlink()  # a plain folder of runs
    with pytest.raises(sparsejax.errors.InputError, match="is a folder of run dirs"):
        sparsejax.load(sweep)


def _dense_export(run, out, capsys):
    capsys.readouterr()
    assert cli.main(["export", str(run), "--format", "safetensors", "--layout", "dense",
                     "--out", str(out)]) == 0
    assert f"wrote {out / 'model_dense.safetensors'} (dense)" in capsys.readouterr().out
    return out / "model_dense.safetensors"


@pytest.mark.parametrize(("fmt", "layout"), [("bsr", "dense"), ("nm", "bsr"), ("hf", "nm")])
def test_a_layout_the_format_contradicts_is_one_line(finished_run, tmp_path, capsys, fmt,
                                                      layout):
    # --format bsr|nm|hf is its layout: another --layout was silently ignored
    line = one_error_line(capsys, ["export", str(finished_run), "--format", fmt, "--layout",
                                   layout, "--out", str(tmp_path / "o")])
    assert f"layout '{layout}' needs format 'safetensors' or 'npz'" in line
    assert not (tmp_path / "o").exists()


def test_dense_export_holds_every_leaf_of_the_run(finished_run, tmp_path, capsys):
    """``export --format safetensors --layout dense``: every leaf a plain dense tensor with its
    SHA-256 and the run's config.json; ``load_export`` puts exactly ``sparsejax.load``'s
    params and model config on its GPT (the logits: the slow test below)."""
    out = tmp_path / "out"
    path = _dense_export(finished_run, out, capsys)
    loaded = sparsejax.load(finished_run)
    model = sparsejax.load_export(path)
    assert model.cfg == loaded.model.cfg
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for (pa, a), (pb, b) in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                                jax.tree_util.tree_flatten_with_path(loaded.params)[0],
                                strict=True):
        assert pa == pb and np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    header = _safetensors_header(out / "model_dense.safetensors")
    meta = json.loads(header["__metadata__"]["sparsejax"])
    assert {v["kind"] for v in meta["layout"].values()} == {"dense"}
    assert meta["config"] == json.loads((finished_run / rundir.RunDir.CONFIG).read_text())
    assert set(meta["sha256"]) == set(header) - {"__metadata__"}
    assert header["blocks.0.attn.query.kernel"]["shape"] == [64, 64]


@pytest.mark.slow
def test_dense_export_loads_with_the_logits_of_the_run(finished_run, tmp_path, capsys, tokens):
    path = _dense_export(finished_run, tmp_path / "out", capsys)
    ref = np.asarray(sparsejax.load(finished_run).model(tokens))
    np.testing.assert_array_equal(np.asarray(sparsejax.load_export(path)(tokens)), ref)


@pytest.mark.slow
def test_dense_export_of_an_unstructured_sparse_run(sparse_run, tmp_path, tokens):
    """The 50% unstructured run, which BSR / N:M exports refuse, exports dense (npz and
    safetensors): the masks applied (pruned weights exactly 0) and ``sparsejax.load``'s
    logits bit for bit."""
    from sparsejax.downstream import export

    loaded = sparsejax.load(sparse_run)
    ref = np.asarray(loaded.model(tokens))
    for fmt in ("safetensors", "npz"):
        result = export.export_run(sparse_run, fmt, layout="dense", out=tmp_path)
        assert result.layout == "dense" and result.nbytes == result.dense_nbytes
        model = sparsejax.load_export(result.path)
        np.testing.assert_array_equal(np.asarray(model(tokens)), ref)
        kernel = np.asarray(model.blocks[0].mlp.fc_in.kernel[...])
        mask = np.asarray(loaded.masks["blocks"][0]["mlp"]["fc_in"]["kernel"])
        assert not mask.all() and (kernel[~mask] == 0).all()


def _hand_written_run(config, run):
    """A run dir written by hand: ``config`` and a step-0 checkpoint of random float32 weights
    for its model (no training); returns ``(run, params)``."""
    spec = configlib.stored_spec(config.to_dict(), "tiny")
    _, state, _ = nnx.split(loading.build_model(spec, 256), nnx.Param, ...)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                                    nnx.to_pure_dict(state))
    run.mkdir()
    rundir.write_json(run / rundir.RunDir.CONFIG, spec.to_dict())
    checkpoint.save_weights(run, 0, params)
    return run, params


@pytest.mark.slow
@pytest.mark.parametrize("family", ["factorized", "parallel", "doped"])
def test_a_sparse_ift_run_loads_and_exports_dense(tmp_path, family):
    """A Sparse-IFT run (its layers hold several linears: U and V, branches, a low-rank path)
    loads onto its own layers (it was rebuilt as a plain GPT and refused) and its dense export
    loads back with every leaf; written by hand (random weights, no training)."""
    from sparsejax.downstream import export

    c = tiny_config(model__sparse_ift__family=family, model__sparse_ift__sparsity=0.5,
                    sparsity__method="static", sparsity__final=0.5)
    run, params = _hand_written_run(c, tmp_path / "run")
    loaded = sparsejax.load(run)
    result = export.export_run(run, "npz", layout="dense", out=tmp_path / "out")
    got = nnx.to_pure_dict(nnx.state(sparsejax.load_export(result.path), nnx.Param))
    for tree in (loaded.params, got):
        for (pa, a), (pb, b) in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                                    jax.tree_util.tree_flatten_with_path(params)[0],
                                    strict=True):
            assert pa == pb
            np.testing.assert_array_equal(np.asarray(a), b)


def test_export_hf_writes_gpt2_for_learned_positions_and_refuses_rotary(finished_run, tmp_path,
                                                                        capsys):
    """``sparsejax export --format hf``: a learned-position run becomes a GPT-2 folder whose
    tensors are the run's (fused QKV = query, key, value side by side); the rotary fixture run
    is refused with the reason, nothing written."""
    run, params = _hand_written_run(tiny_config(model__pos="learned"), tmp_path / "run")
    capsys.readouterr()
    assert cli.main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "o")]) == 0
    hf_config = json.loads((tmp_path / "o" / "hf" / "config.json").read_text())
    assert (hf_config["n_layer"], hf_config["n_embd"], hf_config["n_positions"]) == (2, 64, 32)
    from sparsejax.downstream import safetensors_io

    tensors, _ = safetensors_io.read(tmp_path / "o" / "hf" / "model.safetensors")
    attn = params["blocks"][1]["attn"]
    np.testing.assert_array_equal(tensors["transformer.h.1.attn.c_attn.weight"][:, 64:128],
                                  attn["key"]["kernel"])
    np.testing.assert_array_equal(tensors["transformer.wpe.weight"], params["pos_embed"])
    line = one_error_line(capsys, ["export", str(finished_run), "--format", "hf", "--out",
                                    str(tmp_path / "r")])
    assert "rotary positions (model.pos=rope)" in line and not (tmp_path / "r" / "hf").exists()
