"""Downstream (issue 16): load a run as a model, fine-tune from a config (sparse, dense,
SquareHead), export that reloads, sparse model soups. One tiny static-sparse pre-training run
(module scope) serves every test; ``finished_run`` (dense) is the SquareHead teacher."""

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
from conftest import tiny_config
from flax import nnx

import sparsejax
from sparsejax import cli
from sparsejax.downstream import loading, soup
from sparsejax.models.gpt import GPT
from sparsejax.prunable import prunable_tree
from sparsejax.run import build, checkpoint, configlib, data, experiment, rundir
from sparsejax.run.distill import SquareHeadWeights, squarehead_terms
from sparsejax.run.train import TrainState

FT_STEPS = 2  # warm-up 1: step 0 runs at lr 0, step 1 moves every trainable weight


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


def test_stdlib_tests_source_is_the_excluded_domain():
    root = data.stdlib_root()
    tests = data.stdlib_test_files(root)
    assert tests and all({"test", "tests"} & set(r.split("/")[:-1]) for r in tests)
    assert not set(tests) & set(data.stdlib_files(root))
    assert configlib.apply_arg(configlib.base(), "data.source=stdlib-tests").data.source


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


def test_export_refuses_an_unstructured_run(sparse_run, capsys):
    for fmt, words in (("bsr", ("refused", "saves", "10%", "block masks", "N:M")),
                       ("nm", ("refused", "blocks/", "not 2:4 sparse", "sparsity.method=nm"))):
        capsys.readouterr()
        assert cli.main(["export", str(sparse_run), "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("sparsejax: error:")
        assert all(w in err for w in words), err
    assert not (sparse_run / "export").exists()


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


def test_prune_more_removes_the_smallest_kept_weights():
    params = {"a": np.asarray([[0.0, 3.0], [-1.0, 2.0]], np.float32), "b": np.float32(7)}
    masks = {"a": np.asarray([[False, True], [True, True]]), "b": np.bool_(True)}
    p, m = soup.prune_more(params, masks, 1 / 3)  # 1 of the 3 kept: |-1| goes
    np.testing.assert_array_equal(m["a"], [[False, True], [False, True]])
    np.testing.assert_array_equal(p["a"], [[0.0, 3.0], [0.0, 2.0]])
    assert soup.mask_sparsity(m) == 0.5 and p["b"] == 7
