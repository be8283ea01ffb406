"""Sampling from a loaded run (sparsejax.downstream.generate, ``sparsejax sample``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparsejax
from sparsejax import errors
from sparsejax.cli import main
from sparsejax.downstream.generate import generate_ids
from sparsejax.run.tokenizer import ByteTokenizer

PROMPT = np.array([100, 101, 102, 32, 102], np.int32)  # "def f"
NEW = 40  # one max_new_tokens everywhere: one compile of the decode loop for the module


@pytest.fixture(scope="module")
def loaded(finished_run):
    """The tiny run's model with noise added to every weight, so the argmax depends on the
    context (an 8-step model predicts almost only spaces, which an off-by-one would not show)."""
    base = sparsejax.load(finished_run)
    graphdef, state = nnx.split(base.model)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    noisy = [x + 0.5 * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype,
             jnp.floating) else x for x, k in zip(leaves, keys, strict=True)]
    model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, noisy))
    return base._replace(model=model)


def test_greedy_is_the_argmax_of_the_full_forward_at_every_step(loaded):
    L = loaded.model.cfg.n_ctx  # 32: 5 prompt + 40 new tokens slide the window 13 times
    new = generate_ids(loaded, PROMPT, max_new_tokens=NEW, temperature=0.0)
    assert len(set(new.tolist())) > 3  # the check below can tell positions apart
    seq = np.concatenate([PROMPT, new])
    # token p is predicted from seq[:p] while p <= L (the causal forward of the first L tokens
    # at position p - 1), then from the last L tokens (a sliding window, at position L - 1)
    ps = np.arange(len(PROMPT), len(seq))
    rows = np.stack([seq[:L] if p <= L else seq[p - L:p] for p in ps])
    at = np.minimum(ps, L) - 1
    graphdef, state = nnx.split(loaded.model)
    logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(rows))
    np.testing.assert_array_equal(seq[ps], np.asarray(logits)[np.arange(len(ps)), at].argmax(-1))


def test_top_k_1_is_greedy_and_a_seed_gives_the_same_text(loaded):
    greedy = generate_ids(loaded, PROMPT, max_new_tokens=NEW, temperature=0.0)
    top1 = generate_ids(loaded, PROMPT, max_new_tokens=NEW, temperature=0.7, top_k=1, seed=5)
    np.testing.assert_array_equal(top1, greedy)
    a = generate_ids(loaded, PROMPT, max_new_tokens=NEW, temperature=1.0, seed=3)
    b = generate_ids(loaded, PROMPT, max_new_tokens=NEW, temperature=1.0, seed=3)
    c = generate_ids(loaded, PROMPT, max_new_tokens=NEW, temperature=1.0, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, greedy)


def test_text_goes_through_the_runs_tokenizer(loaded):
    text = sparsejax.generate(loaded, "def f", max_new_tokens=NEW, temperature=0.0)
    ids = generate_ids(loaded, PROMPT, max_new_tokens=NEW, temperature=0.0)
    assert text == ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo ✓")) == "héllo ✓"


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=257), "top_k"),
    (dict(seed=-1), "seed"),
])
def test_bad_arguments_name_themselves(loaded, kwargs, match):
    with pytest.raises(errors.InputError, match=match):
        sparsejax.generate(loaded, "x", **kwargs)


def test_a_prompt_longer_than_the_context_is_refused(loaded):
    with pytest.raises(errors.InputError, match=r"longer than the model's context.*n_ctx = 32"):
        sparsejax.generate(loaded, "x" * 33, max_new_tokens=1)


def test_sample_command(finished_run, capsys):
    assert main(["sample", str(finished_run), "--prompt", "def ", "--max-new-tokens", str(NEW),
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    expected = sparsejax.generate(sparsejax.load(finished_run), "def ", NEW, 0.0)
    assert out == "def " + expected + "\n"
    assert main(["sample", str(finished_run), "--prompt", "x", "--top-k", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsejax: error: top_k must be")
