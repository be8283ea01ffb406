"""Downstream (issue 16): load a run as a model, fine-tune from a config (sparse, dense,
SquareHead), export that reloads, sparse model soups. One tiny static-sparse pre-training run
(module scope) serves every test; ``finished_run`` (dense) is the SquareHead teacher."""

from __future__ import annotations

import json
import re
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

import sparsejax
from sparsejax import checkpoint, cli, configlib, data, experiment, loading, runlog, soup
from sparsejax import masks as masks_lib
from sparsejax.distill import SquareHeadWeights, squarehead_terms
from sparsejax.prunable import prunable_tree
from sparsejax.train import TrainState

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
    """The run's training state restored into the structure training built (independent of
    ``sparsejax.load``): model, optimizer state and params as the training loop held them."""
    config = loading.read_config(run_dir)
    exp = experiment.build(config)
    graphdef, state, rest = nnx.split(exp.model, nnx.Param, ...)
    params = nnx.to_pure_dict(state)
    opt_state = exp.tx.init(params)
    like = TrainState(jnp.zeros((), jnp.int32), params, opt_state, jax.random.PRNGKey(0),
                      *(jnp.zeros((), jnp.float32),) * 3, jnp.zeros((), jnp.int32))
    restored, _ = checkpoint.restore_newest(run_dir, like)
    restored = TrainState(*restored)
    weights = sparsejax.forward_params(restored.params, restored.opt_state)
    nnx.replace_by_pure_dict(state, weights)
    return nnx.merge(graphdef, state, rest), restored, exp


def test_load_round_trip(sparse_run, tokens):
    loaded = sparsejax.load(sparse_run)
    model, restored, exp = _restored_training_state(sparse_run)
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
    # the run's own final validation loss, recomputed on the loaded model
    summary = json.loads((sparse_run / "summary.json").read_text())
    val = soup.Evaluator(loaded.model, loaded.config, exp.corpus)(loaded.params)
    assert val == pytest.approx(summary["val_loss"], rel=1e-6)
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


def test_finetune_sparse_keeps_zeros_dense_frees_them(sparse_run, finished_run, tmp_path):
    pre = sparsejax.load(sparse_run)
    runs = {}
    for mode, extra in (("sparse", dict(finetune__distill="squarehead",
                                        finetune__teacher=str(finished_run))),
                        ("dense", {})):
        c = tiny_config(init_from=str(sparse_run), finetune__mode=mode,
                        checkpoint__every=FT_STEPS, **extra)
        c.train.steps = c.eval.every = FT_STEPS
        summary = experiment.run(c, str(tmp_path / mode), progress=False)
        assert summary["status"] == "completed"
        runs[mode] = sparsejax.load(tmp_path / mode)
    sparse, dense = runs["sparse"], runs["dense"]
    pruned_any = False
    for p0, m0, ps, pd in zip(*(jax.tree_util.tree_leaves(t) for t in (
            pre.params, pre.masks, sparse.params, dense.params)), strict=True):
        if not np.ndim(m0):
            continue
        pruned = ~np.asarray(m0)
        pruned_any |= pruned.any()
        assert np.all(np.asarray(ps)[pruned] == 0)  # every zero in place
        assert np.any(np.asarray(ps)[~pruned] != np.asarray(p0)[~pruned])  # the rest trained
        assert np.count_nonzero(np.asarray(pd)[pruned]) > 0.9 * pruned.sum()  # freed
    assert pruned_any
    for a, b in zip(jax.tree_util.tree_leaves(sparse.masks),
                    jax.tree_util.tree_leaves(pre.masks), strict=True):
        np.testing.assert_array_equal(a, b)
    assert dense.masks is None  # a dense fine-tune has no masks left
    # SquareHead's objective is the logged train loss; validation stays the cross-entropy
    metrics = runlog.read_metrics(tmp_path / "sparse")
    assert metrics[-1]["train_loss"] > metrics[-1]["val_loss"]


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
    runlog.write_json(dst / "config.json", loaded.config.to_dict())
    checkpoint.save_weights(dst, 0, params, masks)
    return sparsejax.load(dst)


def _safetensors_header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert n % 8 == 0 and len(raw) == 8 + n + max(v["data_offsets"][1] for k, v in
                                                  header.items() if k != "__metadata__")
    return header


def test_export_load_export_logits_equal(sparse_run, tokens, tmp_path, capsys):
    base = sparsejax.load(sparse_run)
    score = jax.tree_util.tree_map(jnp.abs, base.params)
    prunable = prunable_tree(base.params)
    nm_run = _pruned_run(sparse_run, tmp_path / "nm",
                         masks_lib.nm_masks(score, 2, 4, prunable))
    sparsities = jax.tree_util.tree_map(lambda p: 0.75 if p else 0.0, prunable)
    block_run = _pruned_run(sparse_run, tmp_path / "block",
                            masks_lib.block_masks(score, sparsities, (16, 16), prunable))
    cases = [(tmp_path / "nm", "nm", [], "export_nm.npz", "NMLinear"),
             (tmp_path / "nm", "safetensors", [], "model.safetensors", "NMLinear"),
             (tmp_path / "block", "bsr", ["--block", "16,16"], "export_bsr.npz", "BSRLinear"),
             (tmp_path / "block", "safetensors", ["--block", "16,16"], "model.safetensors",
              "BSRLinear")]
    for run_dir, fmt, extra, name, layer in cases:
        capsys.readouterr()
        assert cli.main(["export", str(run_dir), "--format", fmt, *extra]) == 0
        out = capsys.readouterr().out
        assert "x the dense size" in out
        ref = (nm_run if run_dir.name == "nm" else block_run).model(tokens)
        path = run_dir / "export" / name
        exact = sparsejax.load_export(path, kernels=False)
        np.testing.assert_array_equal(np.asarray(exact(tokens)), np.asarray(ref))
        fast = sparsejax.load_export(path)
        assert type(fast.blocks[1].mlp.fc_in).__name__ == layer
        np.testing.assert_allclose(np.asarray(fast(tokens)), np.asarray(ref), rtol=1e-5,
                                   atol=1e-5)
        if fmt == "safetensors":
            header = _safetensors_header(path)
            meta = json.loads(header["__metadata__"]["sparsejax"])
            assert meta["model"]["n_layer"] == 2
            kind = "nm" if layer == "NMLinear" else "bsr"
            assert meta["layout"]["blocks/0/mlp/fc_in/kernel"]["kind"] == kind
            if kind == "bsr":  # only the non-zero 16x16 blocks: 25% of the 4x16 grid
                assert header["blocks.0.mlp.fc_in.kernel.values"]["shape"] == [16, 16, 16]
            else:  # values + packed 2-bit positions (two per byte per group pair)
                assert header["blocks.0.mlp.fc_in.kernel.values"]["shape"] == [32, 256]
    ratio = re.search(r"([0-9.]+)x the dense size", out)
    assert ratio and float(ratio.group(1)) < 0.5  # 75% of the blocks gone


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
    got = squarehead_terms(s_logits, hs, t_logits, ht, jnp.asarray([[0]]), w)
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
    got = squarehead_terms(f32(s), list(map(f32, hs)), f32(t), list(map(f32, ht)),
                           jnp.asarray(y), w)
    np.testing.assert_allclose(float(got.loss), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="layer by layer"):
        squarehead_terms(f32(s), list(map(f32, hs[:3])), f32(t), list(map(f32, ht)),
                         jnp.asarray(y), w)


def test_soup_keeps_the_mask_and_greedy_is_never_worse(sparse_run, tmp_path):
    c = tiny_config(init_from=str(sparse_run), soup__ingredients=2, checkpoint__every=FT_STEPS)
    c.train.steps = c.eval.every = FT_STEPS
    result = soup.soup(c, tmp_path / "soup")
    cycle = result["cycles"][0]
    ingredients = [sparsejax.load(i["run_dir"]) for i in cycle["ingredients"]]
    uniform = sparsejax.load(cycle["uniform"]["run_dir"])
    greedy = sparsejax.load(cycle["greedy"]["run_dir"])
    n_zero = lambda ld: sum(int(np.sum(np.asarray(p)[~np.asarray(m)] == 0))  # noqa: E731
                            for p, m in zip(jax.tree_util.tree_leaves(ld.params),
                                            jax.tree_util.tree_leaves(ld.masks), strict=True)
                            if np.ndim(m))
    pre = sparsejax.load(sparse_run)
    for ld in (*ingredients, uniform, greedy):
        assert soup.mask_sparsity(ld.masks) == soup.mask_sparsity(pre.masks) == cycle["sparsity"]
        assert n_zero(ld) == n_zero(pre)  # every pruned weight exactly 0
    for u, a, b in zip(*(jax.tree_util.tree_leaves(x.params) for x in
                         (uniform, *ingredients)), strict=True):
        np.testing.assert_allclose(np.asarray(u), (np.asarray(a, np.float64)
                                                   + np.asarray(b, np.float64)) / 2, rtol=1e-6,
                                   atol=1e-7)
    first = min(i["val_loss"] for i in cycle["ingredients"])
    assert cycle["best_ingredient"] == first
    assert cycle["greedy"]["val_loss"] <= first
    assert cycle["greedy"]["members"][0] == min(cycle["ingredients"],
                                                key=lambda i: i["val_loss"])["run_dir"]


def test_prune_more_removes_the_smallest_kept_weights():
    params = {"a": np.asarray([[0.0, 3.0], [-1.0, 2.0]], np.float32), "b": np.float32(7)}
    masks = {"a": np.asarray([[False, True], [True, True]]), "b": np.bool_(True)}
    p, m = soup.prune_more(params, masks, 1 / 3)  # 1 of the 3 kept: |-1| goes
    np.testing.assert_array_equal(m["a"], [[False, True], [False, True]])
    np.testing.assert_array_equal(p["a"], [[0.0, 3.0], [0.0, 2.0]])
    assert soup.mask_sparsity(m) == 0.5 and p["b"] == 7
