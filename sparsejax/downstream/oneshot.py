"""One-shot pruning of a trained checkpoint and the essential-sparsity curve.

Jaiswal et al. 2023 ("The Emergence of Essential Sparsity in Large Pre-trained Models: The
Weights that Matter") remove the smallest-magnitude weights of a pre-trained checkpoint in one
shot, without retraining, at increasing sparsity, and call the sharp turning point of the
loss-vs-sparsity curve the *essential sparsity*. :func:`oneshot` does this for a run dir:

* **Selection.** Unstructured magnitude pruning is *global* by default (one threshold over all
  prunable leaves, the one-shot magnitude pruning of that setup; embeddings, norms and biases
  stay dense by :data:`sparsejax.prunable.default_prunable`); ``allocation="layerwise"``
  prunes every leaf to the same sparsity. Calibration scores default to layer-wise, since
  their activation scales differ across layers: Wanda (Sun et al. 2023) ``|w| * ||x_j||`` and
  GBLM-Pruner (Das et al. 2023) ``|w| * (||x_j|| + alpha * ||g||)`` (the papers compare
  within each output row; that finer group is not offered here). Selection is exact
  (:mod:`sparsejax.masks`): a global level ``s`` prunes exactly ``round(s * N)`` of the
  ``N`` prunable weights.
* **Structure.** ``"unstructured"``, ``"N:M"`` (N of every M along the input axis,
  :func:`sparsejax.masks.nm_masks`; a single level at sparsity ``1 - N/M``) or ``"block"``
  (whole tiles by tile norm, layer-wise, :func:`sparsejax.masks.block_masks`).
* **Evaluation.** The training loop's own evaluation path (:mod:`sparsejax.run.evaluation`):
  the fixed set ``evaluation.eval_set`` of the validation split with the run's ``eval.seed``,
  ``eval.batches``, ``eval.batch_size`` and ``train.seq_len``, scored per sequence by
  ``evaluation.sequence_losses``. Every point (dense and each level) records ``val_loss`` ±
  ``val_loss_se`` (``s/√n`` over windows), ``eval_sequences`` and ``eval_sha256``; with
  ``--eval-batches`` equal to the run's ``eval.final_batches``, sparsity 0 reproduces the run's
  final ``val_loss`` and ``eval_sha256`` (``summary.json``).
* **Knee.** The largest evaluated sparsity whose mean loss is within ``tolerance`` (relative) of
  the dense mean loss: ``loss <= dense * (1 + tolerance)``; ``None`` when no level is.

``oneshot`` writes ``oneshot.json`` and ``oneshot.png`` (loss vs sparsity, dense line,
tolerance band, knee) into the run dir; ``sparsejax oneshot RUN_DIR`` is its command line.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import calibration, errors, masks
from sparsejax import prunable as prunable_lib
from sparsejax import scores as scores_lib
from sparsejax.downstream import loading
from sparsejax.models.gpt import GPT, loss_fn
from sparsejax.paths import path_str
from sparsejax.run import data, evaluation, rundir
from sparsejax.run.rundir import RunDir
from sparsejax.run.spec import RunSpec

SCORES = ("magnitude", "wanda", "gblm")
ALLOCATIONS = ("global", "layerwise")
DEFAULT_SPARSITIES = tuple(round(0.1 * i, 1) for i in range(1, 10))


@dataclasses.dataclass
class LoadedRun:
    """A run dir's model (holding the checkpoint's params), params, config and corpus."""

    model: GPT
    params: dict[str, Any]  # pure nested dict, the structure of nnx.to_pure_dict
    config: RunSpec
    corpus: data.Corpus
    step: int


def load_run(run_dir: str | Path, step: int | None = None) -> LoadedRun:
    """Rebuild a run's GPT from ``RUN_DIR/config.json`` and load its checkpoint (the latest,
    or ``step``). Raises ``FileNotFoundError``/``ValueError`` naming the missing path."""
    config = loading.read_config(run_dir)
    step = loading.checkpoint_step(run_dir, step)  # names a missing checkpoint (step)
    if config.model.linear != "dense":
        raise errors.InputError(f"{RunDir(run_dir).config_file}: model.linear must be 'dense' "
                                f"for one-shot pruning, got {config.model.linear!r}")
    loaded = loading.load(run_dir, step=step, dense=True)
    corpus = data.load_spec(config.data)
    return LoadedRun(loaded.model, loaded.params, config, corpus, loaded.step)


def parse_sparsities(text: str) -> list[float]:
    """``"0.1,0.2,..."`` -> sorted unique floats, each in ``[0, 1]`` (``ValueError`` else)."""
    values = []
    for item in text.split(","):
        try:
            v = float(item)
        except ValueError:
            raise errors.InputError(f"--sparsities: {item.strip()!r} is not a number "
                                    "(expected comma-separated values in [0, 1])") from None
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise errors.InputError(f"--sparsities: every value must be in [0, 1], got "
                                    f"{item.strip()}")
        values.append(v)
    return sorted(set(values))


def parse_structure(structure: str) -> tuple[str, tuple[int, int] | None]:
    """``"unstructured"``, ``"block"`` or ``"N:M"`` -> ``(kind, (n, m) or None)``."""
    if structure in ("unstructured", "block"):
        return structure, None
    match = re.fullmatch(r"(\d+):(\d+)", structure)
    if match is None:
        raise errors.InputError(f"structure must be 'unstructured', 'block' or 'N:M' (e.g. "
                                f"'2:4'), got {structure!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise errors.InputError(f"structure {structure!r}: need 0 < N < M")
    return "nm", (n, m)


def knee(sparsities: Sequence[float], losses: Sequence[float], dense_loss: float,
         tolerance: float) -> float | None:
    """The largest sparsity whose loss is within ``tolerance`` (relative) of ``dense_loss``:
    ``loss <= dense_loss + tolerance * |dense_loss|`` (Jaiswal et al. 2023's essential
    sparsity, read off the curve); ``None`` when no level is within.

    >>> knee([0.1, 0.5, 0.9], [2.0, 2.01, 3.0], 2.0, 0.01)
    0.5
    """
    bound = dense_loss + tolerance * abs(dense_loss)
    within = [s for s, v in zip(sparsities, losses, strict=True) if math.isfinite(v) and v <= bound]
    return max(within) if within else None


def prune(params: Any, scores: Any, sparsity: float | jax.Array, prunable: Any, *,
          structure: str = "unstructured", allocation: str = "global",
          block: tuple[int, int] = (16, 16)) -> tuple[Any, Any]:
    """``(params * masks, masks)``: keep the highest ``scores`` per ``structure`` (see the
    module docstring); ``prunable`` is a pytree of Python bools shaped like params."""
    kind, nm = parse_structure(structure)
    if kind == "nm":
        mask = masks.nm_masks(scores, nm[0], nm[1], prunable)
    elif kind == "block":
        sps = jax.tree.map(lambda _: sparsity, scores)
        mask = masks.block_masks(scores, sps, block, prunable)
    elif allocation == "global":
        mask = masks.global_topk(scores, sparsity, prunable)
    elif allocation == "layerwise":
        mask = masks.layerwise(scores, jax.tree.map(lambda _: sparsity, scores), prunable)
    else:
        raise errors.InputError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    pruned = jax.tree.map(lambda w, k: jnp.where(k, w, jnp.zeros((), w.dtype)), params, mask)
    return pruned, mask


def compute_scores(loaded: LoadedRun, score: str, *, calibration_batches: int = 4,
                   batch_size: int | None = None, seq_len: int | None = None,
                   alpha: float = 1.0) -> tuple[Any, dict[str, Any] | None]:
    """The ``score`` (``magnitude``, ``wanda``, ``gblm``) of the run's params, and a record of
    the calibration set: ``calibration_batches`` stratified batches of the *training* split
    (``data.eval_batches`` with the run's seed), never the validation batches."""
    if score not in SCORES:
        raise errors.InputError(f"score must be one of {SCORES}, got {score!r}")
    if score == "magnitude":
        return scores_lib.magnitude(loaded.params), None
    c = loaded.config
    bs, sl = batch_size or c.train.batch_size, seq_len or c.train.seq_len
    batches = data.eval_batches(loaded.corpus.train, batch_size=bs, seq_len=sl,
                                n_batches=calibration_batches, seed=c.seed)
    act = calibration.activation_norms(loaded.model, batches)
    record: dict[str, Any] = {"split": "train", "batches": calibration_batches,
                              "batch_size": bs, "seq_len": sl,
                              "tokens": calibration_batches * bs * sl}
    if score == "wanda":
        return calibration.wanda_score(act)(loaded.params), record
    grads = calibration.gradient_norms(loaded.model, batches, loss_fn)
    record["alpha"] = alpha
    return scores_lib.gblm_score(act, alpha=alpha)(loaded.params, grads), record


def oneshot(
    run_dir: str | Path,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    *,
    score: str = "magnitude",
    structure: str = "unstructured",
    allocation: str | None = None,
    block: tuple[int, int] = (16, 16),
    tolerance: float = 0.01,
    step: int | None = None,
    eval_batches: int | None = None,
    eval_batch_size: int | None = None,
    seq_len: int | None = None,
    calibration_batches: int = 4,
    alpha: float = 1.0,
    out: str | Path | None = None,
    plot: bool = True,
    log: Callable[[str], Any] | None = print,
) -> dict[str, Any]:
    """Prune a run's checkpoint in one shot at each sparsity, evaluate each level on the
    validation split, write ``out`` (default ``RUN_DIR/oneshot.json``) and a plot beside it
    (``.png``); returns the JSON record. ``allocation`` defaults to ``"global"`` for
    magnitude and ``"layerwise"`` for the calibration scores; an ``"N:M"`` structure
    evaluates its one level ``1 - N/M`` and ignores ``sparsities``. ``log`` receives one
    progress line per level (``None``: silent)."""
    kind, nm = parse_structure(structure)
    if allocation is None:
        allocation = "global" if score == "magnitude" else "layerwise"
    if allocation not in ALLOCATIONS:
        raise errors.InputError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise errors.InputError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    masks.check_block(block)
    if kind == "nm":
        sparsities = [1.0 - nm[0] / nm[1]]
    sparsities = sorted({float(s) for s in sparsities})
    if not sparsities or not all(0.0 <= s <= 1.0 for s in sparsities):
        raise errors.InputError(f"sparsities must be a non-empty list of values in [0, 1], "
                                f"got {sparsities}")
    say = log or (lambda _: None)
    run_dir = Path(run_dir)
    loaded = load_run(run_dir, step)
    c = loaded.config
    ev = {"split": "val", "batches": eval_batches or c.eval.batches,
          "batch_size": eval_batch_size or c.eval.batch_size,
          "seq_len": seq_len or c.train.seq_len, "seed": c.eval.seed}
    val = evaluation.eval_set(loaded.corpus.val, batch_size=ev["batch_size"],
                              seq_len=ev["seq_len"], n_batches=ev["batches"], seed=ev["seed"])
    per_sequence = evaluation.sequence_losses(loaded.model)
    prunable = prunable_lib.check_selects_something(loaded.params)
    n_prunable = sum(int(np.size(w)) for w, p in zip(
        jax.tree.leaves(loaded.params), jax.tree.leaves(prunable), strict=True) if p)

    dense = evaluation.evaluate(per_sequence, loaded.params, val)
    dense_loss = dense.loss
    say(f"oneshot: {run_dir} step {loaded.step}: dense val loss "
        f"{evaluation.format_loss(dense.loss, dense.se)} ({ev['batches']} x {ev['batch_size']} "
        f"x {ev['seq_len']} tokens of the val split, eval_sha256 {val.sha256})")
    sc, calib = compute_scores(loaded, score, calibration_batches=calibration_batches,
                               seq_len=seq_len, alpha=alpha)
    for path, p in jax.tree_util.tree_flatten_with_path(prunable)[0]:
        if p and not bool(jnp.all(jnp.isfinite(_at(sc, path)))):
            raise errors.InputError(f"score {score!r}: non-finite values at prunable leaf "
                                    f"{path_str(path)}")

    @jax.jit
    def prune_at(params, sc, s):  # params and scores as arguments: no constant folding
        pruned, mask = prune(params, sc, s, prunable, structure=structure,
                             allocation=allocation, block=block)
        kept = sum(jnp.sum(m, dtype=jnp.int32) for m, p in zip(
            jax.tree.leaves(mask), jax.tree.leaves(prunable), strict=True) if p)
        return pruned, kept

    levels = []
    for s in sparsities:
        pruned, kept = prune_at(loaded.params, sc, jnp.float32(s))
        n_pruned = n_prunable - int(kept)
        scored = evaluation.evaluate(per_sequence, pruned, val)
        rel = (scored.loss - dense_loss) / abs(dense_loss)
        levels.append({"sparsity": s, "measured_sparsity": n_pruned / n_prunable,
                       "n_pruned": n_pruned, "score": score, "structure": structure,
                       "allocation": allocation, **evaluation.summary_fields(scored),
                       "relative_increase": rel})
        say(f"  sparsity {s:.3f} (measured {n_pruned / n_prunable:.4f}): val loss "
            f"{evaluation.format_loss(scored.loss, scored.se)} ({100 * rel:+.2f}% vs dense)")
    k = knee([lv["sparsity"] for lv in levels], [lv["val_loss"] for lv in levels], dense_loss,
             tolerance)
    k_loss = next((lv["val_loss"] for lv in levels if lv["sparsity"] == k), None)
    result = {
        "run_dir": str(run_dir.absolute()), "step": loaded.step, "score": score,
        "structure": structure, "allocation": allocation,
        "block": list(block) if kind == "block" else None, "prunable": "default_prunable",
        "n_prunable": n_prunable, "eval": ev, "calibration": calib,
        "dense": evaluation.summary_fields(dense), "dense_val_loss": dense_loss,
        "tolerance": tolerance,
        "tolerance_rule": "relative: val_loss <= dense_val_loss * (1 + tolerance)",
        "knee": None if k is None else {"sparsity": k, "val_loss": k_loss},
        "levels": levels,
    }
    run = RunDir(run_dir)
    out, png = ((run.oneshot_file, run.oneshot_plot) if out is None
                else (Path(out), Path(out).with_suffix(".png")))
    rundir.write_json(out, result)
    say(f"knee (essential sparsity): {'none' if k is None else f'{k:.3f}'} = the largest "
        f"sparsity whose val loss is within {100 * tolerance:g}% (relative) of dense "
        f"{dense_loss:.4f}")
    say(f"wrote {out}")
    if plot:
        say(f"wrote {plot_curves([result], png)}")
    return result


def _at(tree: Any, path: Sequence[Any]) -> Any:
    for k in path:
        tree = tree[getattr(k, "key", getattr(k, "idx", k))]
    return tree


def table(result: dict[str, Any]) -> str:
    """A plain-text table of one :func:`oneshot` result: loss ± SE at each level."""
    dense = result.get("dense") or {"val_loss": result["dense_val_loss"]}  # older files: no SE
    lines = [f"{'sparsity':>8} {'measured':>9} {'val_loss ± SE':>17} {'vs dense':>9}",
             f"{0.0:>8.3f} {0.0:>9.4f} "
             f"{evaluation.format_loss(dense['val_loss'], dense.get('val_loss_se')):>17} "
             f"{'dense':>9}"]
    for lv in result["levels"]:
        lines.append(f"{lv['sparsity']:>8.3f} {lv['measured_sparsity']:>9.4f} "
                     f"{evaluation.format_loss(lv['val_loss'], lv.get('val_loss_se')):>17} "
                     f"{100 * lv['relative_increase']:>+8.2f}%")
    k = result["knee"]
    lines.append(f"knee: {'none' if k is None else k['sparsity']} (tolerance "
                 f"{100 * result['tolerance']:g}% relative)")
    return "\n".join(lines)


def plot_curves(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Loss vs sparsity of one or more :func:`oneshot` results (same run) in one figure:
    each curve, the dense loss, the tolerance band of the first result and each knee."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    first = results[0]
    dense, tol = first["dense_val_loss"], first["tolerance"]
    ax.axhline(dense, color="black", lw=1, label=f"dense {dense:.4f}")
    ax.axhspan(dense, dense + tol * abs(dense), color="grey", alpha=0.25,
               label=f"tolerance +{100 * tol:g}%")
    for r in results:
        xs = [0.0] + [lv["sparsity"] for lv in r["levels"]]
        ys = [r["dense_val_loss"]] + [lv["val_loss"] for lv in r["levels"]]
        name = f"{r['score']} ({r['structure']}, {r['allocation']})"
        (line,) = ax.plot(xs, ys, marker="o", ms=3, label=name)
        if r["knee"] is not None:
            ax.plot([r["knee"]["sparsity"]], [r["knee"]["val_loss"]], marker="*", ms=14,
                    color=line.get_color(), ls="none",
                    label=f"knee {r['score']}: {r['knee']['sparsity']:g}")
    ax.set_xlabel("sparsity (fraction of prunable weights removed)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"one-shot pruning, step {first['step']} of {Path(first['run_dir']).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
