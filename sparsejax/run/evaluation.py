"""Held-out evaluation fit for scaling work: a fixed token set, per-sequence losses, their SE.

A scaling-law fit compares final losses across runs that differ by a few percent, so every run
of a sweep must be scored on the *same* tokens, and the score must come with its sampling error.
:func:`eval_set` draws ``n_batches · batch_size`` windows of the validation split with
:func:`sparsejax.run.data.eval_batches` (one window drawn uniformly inside each of as many equal
strata of the split) from a fixed *eval* seed, never the run's seed: the set is a deterministic
function of the data, the sizes and ``eval_seed`` alone, and :func:`fingerprint` names it, so
two runs that report the same ``eval_sha256`` in ``summary.json`` were scored on the same tokens.

Standard error (:func:`summarize`). Each window ``i`` gives a per-sequence loss ``l_i`` (the mean
next-token cross-entropy over its ``L`` positions); the reported loss is their mean
``l̄ = (1/n) Σ l_i`` (equal to the token mean: all windows have ``L`` targets) and its standard
error is ``SE = s / √n`` with ``s² = Σ (l_i − l̄)² / (n − 1)``. Tokens inside a window are
correlated, windows are (nearly) independent draws, so the window is the sampling unit. The
windows are a stratified sample (one per stratum) rather than a simple random one; ``s/√n``
is the simple-random-sampling estimator, which for a one-per-stratum sample over-states the
variance whenever the loss varies smoothly along the split (neighbouring strata share files),
so the SE reported is conservative. It measures the error of ``l̄`` as an estimate of the
model's expected loss on a window of the validation split, for fixed weights; it does not
include run-to-run (seed) variation.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from sparsejax.run import data


class EvalSet(NamedTuple):
    xs: np.ndarray  # shape=(n_batches, B, L), int32 inputs
    ys: np.ndarray  # shape=(n_batches, B, L), int32 targets
    sha256: str  # fingerprint of the tokens (first 16 hex digits)


class EvalResult(NamedTuple):
    loss: float  # mean per-sequence loss (nats/token)
    se: float | None  # standard error of ``loss`` (None when n < 2)
    n_sequences: int


def fingerprint(xs: np.ndarray, ys: np.ndarray) -> str:
    """The first 16 hex digits of the sha256 of the int32 tokens and their shape."""
    h = hashlib.sha256(repr(xs.shape).encode())
    h.update(np.ascontiguousarray(xs, np.int32).tobytes())
    h.update(np.ascontiguousarray(ys, np.int32).tobytes())
    return h.hexdigest()[:16]


def eval_set(tokens: np.ndarray, *, batch_size: int, seq_len: int, n_batches: int,
             seed: int) -> EvalSet:
    """The fixed evaluation set (a pure function of the tokens, the sizes and ``seed``)."""
    batches = data.eval_batches(tokens, batch_size=batch_size, seq_len=seq_len,
                                n_batches=n_batches, seed=seed)
    xs = np.stack([b[0] for b in batches])
    ys = np.stack([b[1] for b in batches])
    return EvalSet(xs, ys, fingerprint(xs, ys))


def summarize(losses_N: np.ndarray) -> EvalResult:
    """Mean and standard error ``s/√n`` of per-sequence losses (module docstring)."""
    losses = np.asarray(losses_N, np.float64).reshape(-1)
    n = losses.size
    if n == 0:
        raise ValueError("summarize needs at least one per-sequence loss")
    mean = float(losses.mean())
    se = float(losses.std(ddof=1) / math.sqrt(n)) if n >= 2 else None
    return EvalResult(mean, se, n)


def evaluate(per_sequence: Callable[[Any, Any, Any], Any], params: Any,
             eval_set_: EvalSet) -> EvalResult:
    """Score ``params`` on ``eval_set_``: ``per_sequence(params, x_BxL, y_BxL) -> (B,)``
    losses, batch by batch (one compiled shape for any number of batches)."""
    losses = [per_sequence(params, x, y) for x, y in zip(eval_set_.xs, eval_set_.ys,
                                                        strict=True)]
    return summarize(np.concatenate([np.asarray(v, np.float64) for v in losses]))
