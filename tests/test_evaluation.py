"""The final evaluation: a fixed set of validation windows, its mean loss and standard error."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from sparsejax.downstream import oneshot
from sparsejax.run import configlib, data, distributed, evaluation


def _numpy_per_sequence(model, x_NxL, y_NxL) -> np.ndarray:
    """Float64 per-sequence mean cross-entropy of ``model``'s logits (the reference)."""
    forward = nnx.jit(lambda model, tokens: model(tokens))  # one compile, not op by op
    logits = np.asarray(forward(model, x_NxL), np.float64)  # (n, L, V)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(logits, y_NxL[..., None], -1)[..., 0]
    return (lse - picked).mean(-1)


@pytest.mark.slow
def test_summary_loss_and_se_match_a_numpy_recomputation(finished_run):
    """summary.json's val_loss / val_loss_se against float64 numpy from the model's logits."""
    summary = json.loads((finished_run / "summary.json").read_text())
    config = json.loads((finished_run / "config.json").read_text())
    ev = config["eval"]
    loaded = oneshot.load_run(finished_run)
    batches = data.eval_batches(loaded.corpus.val, batch_size=ev["batch_size"],
                                seq_len=config["train"]["seq_len"],
                                n_batches=ev["final_batches"], seed=ev["seed"])
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    per_seq = _numpy_per_sequence(loaded.model, x, y)
    n = len(per_seq)
    assert n == summary["eval_sequences"] == ev["final_batches"] * ev["batch_size"] >= 2
    mean = per_seq.sum() / n
    se = math.sqrt(((per_seq - mean) ** 2).sum() / (n - 1) / n)
    assert summary["val_loss"] == summary["final_val_loss"]
    assert summary["val_loss"] == pytest.approx(mean, rel=1e-5)
    assert summary["val_loss_se"] == pytest.approx(se, rel=1e-4)
    last = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert last[-1]["val_loss"] == summary["val_loss"]  # the last record holds the final eval


@pytest.mark.slow
def test_the_evaluation_path_matches_float64_numpy_sequence_by_sequence(finished_run):
    """sequence_losses + evaluate (the path training, one-shot and soups share) against float64
    numpy on a 3-batch set: every per-sequence loss in order, the mean, the SE, the count and
    the fingerprint; the params argument is what is scored (all-zero weights give uniform
    logits, ln V per token); a mesh gives the same result."""
    loaded = oneshot.load_run(finished_run)
    es = evaluation.eval_set(loaded.corpus.val, batch_size=4, seq_len=32, n_batches=3, seed=5)
    per_sequence = evaluation.sequence_losses(loaded.model)
    got = np.concatenate([np.asarray(per_sequence(loaded.params, x, y))
                          for x, y in zip(es.xs, es.ys, strict=True)])
    want = _numpy_per_sequence(loaded.model, es.xs.reshape(12, 32), es.ys.reshape(12, 32))
    assert got.shape == (12,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)
    r = evaluation.evaluate(per_sequence, loaded.params, es)
    assert (r.n_sequences, r.sha256) == (12, es.sha256)
    assert r.loss == pytest.approx(want.mean(), rel=1e-6)
    assert r.se == pytest.approx(want.std(ddof=1) / math.sqrt(12), rel=1e-4) and r.se > 0
    assert evaluation.summary_fields(r) == {"val_loss": r.loss, "val_loss_se": r.se,
                                            "eval_sequences": 12, "eval_sha256": es.sha256}
    zeros = evaluation.evaluate(per_sequence, jax.tree.map(np.zeros_like, loaded.params), es)
    assert zeros.loss == pytest.approx(math.log(loaded.model.cfg.vocab_size), rel=1e-6)
    on_mesh = evaluation.sequence_losses(loaded.model, mesh=distributed.make_mesh())
    meshed = evaluation.evaluate(on_mesh, loaded.params, es)
    assert meshed.loss == pytest.approx(r.loss, rel=1e-6) and meshed.sha256 == r.sha256


def test_format_loss():
    assert evaluation.format_loss(2.345678, 0.01234) == "2.3457 ± 0.0123"
    assert evaluation.format_loss(2.0, None, digits=2) == "2.00 ± n/a"


def test_summarize_by_hand():
    r = evaluation.summarize(np.array([2.0, 2.5, 3.0, 2.5]))
    # mean 2.5; s^2 = (0.25 + 0 + 0.25 + 0) / 3 = 1/6; SE = sqrt(1/6 / 4)
    assert r.loss == 2.5 and r.n_sequences == 4
    assert r.se == pytest.approx(math.sqrt(1 / 24), rel=1e-12)
    assert evaluation.summarize(np.array([1.0])).se is None
    with pytest.raises(ValueError, match="at least one"):
        evaluation.summarize(np.array([]))


def test_eval_set_is_a_function_of_the_tokens_sizes_and_eval_seed():
    tokens = np.arange(5000, dtype=np.uint16) % 251
    a = evaluation.eval_set(tokens, batch_size=4, seq_len=16, n_batches=3, seed=0)
    b = evaluation.eval_set(tokens, batch_size=4, seq_len=16, n_batches=3, seed=0)
    c = evaluation.eval_set(tokens, batch_size=4, seq_len=16, n_batches=3, seed=1)
    assert a.sha256 == b.sha256 != c.sha256 and a.xs.shape == (3, 4, 16)
    np.testing.assert_array_equal(a.xs, b.xs)


def test_eval_config_validation():
    for key, value, says in (("eval.final_batches", 0, "an int >= 1"),
                             ("eval.seed", -1, "an int >= 0")):
        c = configlib.base()
        configlib.set_key(c, key, value)
        with pytest.raises(ValueError, match=f"config.{key} must be {says}"):
            configlib.validate(c)
    c = configlib.base()
    c.eval.final_batches, c.eval.batch_size = 1, 1
    with pytest.raises(ValueError, match="eval.final_batches.*needs 2 sequences"):
        configlib.validate(c)
