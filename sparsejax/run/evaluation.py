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

One path. Training (and so fine-tuning), one-shot pruning and model soups all score params the
same way: :func:`sequence_losses` (the per-sequence loss step of a model, compiled once per batch
shape) applied by :func:`evaluate` to an :class:`EvalSet`, giving an :class:`EvalResult` that
:func:`summary_fields` writes as ``val_loss``, ``val_loss_se``, ``eval_sequences`` and
``eval_sha256`` and :func:`format_loss` prints as ``loss ± SE``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from sparsejax.models.gpt import cross_entropy
from sparsejax.run import data, distributed

PerSequence = Callable[[Any, Any, Any], jax.Array]  # (params, x_BxL, y_BxL) -> (B,) float32


class EvalSet(NamedTuple):
    xs: np.ndarray  # shape=(n_batches, B, L), int32 inputs
    ys: np.ndarray  # shape=(n_batches, B, L), int32 targets
    sha256: str  # fingerprint of the tokens (first 16 hex digits)


class EvalResult(NamedTuple):
    loss: float  # mean per-sequence loss (nats/token)
    se: float | None  # standard error of ``loss`` (None when n < 2)
    n_sequences: int
    sha256: str | None = None  # the EvalSet's fingerprint (None: losses not from an EvalSet)


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


def merge_model(graphdef: nnx.GraphDef, params_def: Any, rest: nnx.State,
                params: Any) -> nnx.Module:
    """The model of ``nnx.split(model, nnx.Param, ...)`` with ``params`` (a pure dict on the
    params' tree; ``params_def`` is that tree's structure) as its weights; traceable, for
    jitted steps."""
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(params_def, jax.tree.leaves(params)),
                     rest)


def sequence_losses(model: nnx.Module, *, mesh: jax.sharding.Mesh | None = None
                    ) -> PerSequence:
    """The per-sequence loss step of ``model``: ``(params, x_BxL, y_BxL) -> (B,)`` float32,
    each the mean next-token cross-entropy of one window, computed by ``model`` holding
    ``params`` (a pure dict shaped like ``nnx.to_pure_dict`` of its Params). Jitted once, so
    one compiled shape serves any number of batches of an :class:`EvalSet`. With a ``mesh``,
    host batches are split over it (:func:`sparsejax.run.distributed.put`), the step runs with
    the mesh in context (:class:`~sparsejax.run.distributed.OnMesh`: the sparse kernel layers
    split their batch over it) and the losses come back replicated, so every process can
    read them."""
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params_def = jax.tree_util.tree_structure(params_state)
    del params_state

    def per_sequence(params, x_BxL, y_BxL):
        logits_BxLxV = merge_model(graphdef, params_def, rest, params)(x_BxL)
        return jax.vmap(lambda lg, y: cross_entropy(lg[None], y[None]))(logits_BxLxV, y_BxL)

    if mesh is None:
        return jax.jit(per_sequence)
    batch_sh = distributed.batch_sharding(mesh)
    losses = distributed.OnMesh(
        jax.jit(per_sequence, out_shardings=distributed.replicated(mesh)), mesh)
    return lambda params, x_BxL, y_BxL: losses(params, distributed.put(x_BxL, batch_sh),
                                               distributed.put(y_BxL, batch_sh))


def evaluate(per_sequence: PerSequence, params: Any, eval_set_: EvalSet) -> EvalResult:
    """Score ``params`` on ``eval_set_``: ``per_sequence(params, x_BxL, y_BxL) -> (B,)``
    losses (:func:`sequence_losses`), batch by batch (one compiled shape for any number of
    batches), summarized by :func:`summarize`; the result carries the set's fingerprint.

    At most two batches are in flight: a batch's losses are read once the next batch is
    dispatched. XLA:CPU queues at most 32 computations per device, and a dispatch past that
    blocks one of its client's ``max(cores, devices)`` threads; on simulated devices a launch
    over all of them then waits forever for its last device, and the process aborts (the
    final eval's 240 batches did, every time; docs/design.md, "Distributed")."""
    losses: list[np.ndarray] = []
    pending = None
    for x, y in zip(eval_set_.xs, eval_set_.ys, strict=True):
        dispatched = per_sequence(params, x, y)
        if pending is not None:
            losses.append(np.asarray(pending, np.float64))  # waits for the batch before only
        pending = dispatched
    if pending is not None:
        losses.append(np.asarray(pending, np.float64))
    result = summarize(np.concatenate(losses))
    return result._replace(sha256=eval_set_.sha256)


def summary_fields(result: EvalResult) -> dict[str, Any]:
    """The four fields every evaluated point records in its JSON (``summary.json``,
    ``oneshot.json``, ``soup.json``): ``val_loss``, ``val_loss_se``, ``eval_sequences``,
    ``eval_sha256``."""
    return {"val_loss": result.loss, "val_loss_se": result.se,
            "eval_sequences": result.n_sequences, "eval_sha256": result.sha256}


def format_loss(loss: float, se: float | None, digits: int = 4) -> str:
    """``loss ± SE`` for tables and logs (``loss ± n/a`` without an SE).

    >>> format_loss(2.345678, 0.01234)
    '2.3457 ± 0.0123'
    """
    return f"{loss:.{digits}f} ± " + ("n/a" if se is None else f"{se:.{digits}f}")
