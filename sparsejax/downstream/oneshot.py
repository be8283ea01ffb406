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
  ``evaluation.sequence_losses``. Every point (the baseline and each level) records
  ``val_loss`` ± ``val_loss_se`` (``s/√n`` over windows), ``eval_sequences`` and
  ``eval_sha256``; with
  ``--eval-batches`` equal to the run's ``eval.final_batches``, sparsity 0 reproduces the run's
  final ``val_loss`` and ``eval_sha256`` (``summary.json``).
* **Baseline.** The run's own model as its checkpoint holds it, at the run's own sparsity (the
  fraction of its prunable weights at exactly 0): "dense" only for a run with none. A sparse
  run's model is never called dense.
* **Knee.** Relative to that baseline: the largest evaluated sparsity that prunes weights the
  run's own model kept and whose mean loss is within ``tolerance`` (relative) of the
  baseline's mean loss, ``loss <= baseline * (1 + tolerance)``; ``None`` when no such level
  is. Levels that prune nothing the run kept (at or below a sparse run's own sparsity) are the
  baseline again, never the knee. The knee also records the share of the run's kept weights it
  removes.

``oneshot`` writes ``oneshot.json`` and ``oneshot.png`` (loss vs sparsity, the baseline's line
and its sparsity, tolerance band, knee; the loss in the unit the data gives, nats/byte or
nats/token, :func:`scaling.plots.loss_unit`, as the printed lines) into the run dir;
``sparsejax oneshot RUN_DIR`` is its command line.
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
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scaling.plots import loss_label, loss_unit
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
    unit: str  # of its losses: "nats/byte" or "nats/token" (scaling.plots.loss_unit)


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
    unit = loss_unit(dataclasses.asdict(config.data))
    return LoadedRun(loaded.model, loaded.params, config, corpus, loaded.step, unit)


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


def knee(sparsities: Sequence[float], losses: Sequence[float], baseline_loss: float,
         tolerance: float) -> float | None:
    """The largest sparsity whose loss is within ``tolerance`` (relative) of ``baseline_loss``:
    ``loss <= baseline_loss + tolerance * |baseline_loss|`` (Jaiswal et al. 2023's essential
    sparsity, read off the curve); ``None`` when no level is within. :func:`oneshot` passes
    the levels that prune weights the run's own model kept.

    >>> knee([0.1, 0.5, 0.9], [2.0, 2.01, 3.0], 2.0, 0.01)
    0.5
    """
    bound = baseline_loss + tolerance * abs(baseline_loss)
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
    n_zero = sum(int(np.sum(np.asarray(w) == 0)) for w, p in zip(
        jax.tree.leaves(loaded.params), jax.tree.leaves(prunable), strict=True) if p)
    own_sparsity = n_zero / n_prunable
    label = baseline_label(own_sparsity)
    unit = loaded.unit

    base = evaluation.evaluate(per_sequence, loaded.params, val)
    say(f"oneshot: {run_dir} step {loaded.step}: {label}: val loss "
        f"{evaluation.format_loss(base.loss, base.se)} {unit} ({ev['batches']} x "
        f"{ev['batch_size']} x {ev['seq_len']} tokens of the val split, eval_sha256 "
        f"{val.sha256})")
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
        pairs = [(m, w) for m, w, p in zip(jax.tree.leaves(mask), jax.tree.leaves(params),
                                           jax.tree.leaves(prunable), strict=True) if p]
        kept = sum(jnp.sum(m, dtype=jnp.int32) for m, _ in pairs)
        removed = sum(jnp.sum(~m & (w != 0), dtype=jnp.int32) for m, w in pairs)
        return pruned, kept, removed

    levels = []
    for s in sparsities:
        pruned, kept, removed = prune_at(loaded.params, sc, jnp.float32(s))
        n_pruned = n_prunable - int(kept)
        scored = evaluation.evaluate(per_sequence, pruned, val)
        rel = (scored.loss - base.loss) / abs(base.loss)
        levels.append({"sparsity": s, "measured_sparsity": n_pruned / n_prunable,
                       "n_pruned": n_pruned, "newly_pruned": int(removed), "score": score,
                       "structure": structure, "allocation": allocation,
                       **evaluation.summary_fields(scored), "relative_increase": rel})
        note = "" if int(removed) else "; prunes no weight the run kept: the baseline again"
        say(f"  sparsity {s:.3f} (measured {n_pruned / n_prunable:.4f}): val loss "
            f"{evaluation.format_loss(scored.loss, scored.se)} {unit} ({100 * rel:+.2f}% vs "
            f"the run's own model{note})")
    beyond = [lv for lv in levels if lv["newly_pruned"] > 0]
    k = knee([lv["sparsity"] for lv in beyond], [lv["val_loss"] for lv in beyond], base.loss,
             tolerance)
    at_knee = next((lv for lv in beyond if lv["sparsity"] == k), None)
    n_kept = n_prunable - n_zero
    result = {
        "run_dir": str(run_dir.absolute()), "step": loaded.step, "score": score,
        "structure": structure, "allocation": allocation,
        "block": list(block) if kind == "block" else None, "prunable": "default_prunable",
        "n_prunable": n_prunable, "eval": ev, "calibration": calib, "unit": unit,
        "baseline": {**evaluation.summary_fields(base), "sparsity": own_sparsity,
                     "n_zero": n_zero, "label": label},
        "baseline_val_loss": base.loss,
        "tolerance": tolerance,
        "tolerance_rule": "relative: val_loss <= baseline_val_loss * (1 + tolerance), among "
                          "the levels that prune weights the run's own model kept",
        "knee": None if at_knee is None else {
            "sparsity": k, "val_loss": at_knee["val_loss"],
            "removed_of_kept": at_knee["newly_pruned"] / n_kept if n_kept else None},
        "levels": levels,
    }
    run = RunDir(run_dir)
    out, png = ((run.oneshot_file, run.oneshot_plot) if out is None
                else (Path(out), Path(out).with_suffix(".png")))
    rundir.write_json(out, result)
    say(knee_line(result))
    say(f"wrote {out}")
    if plot:
        say(f"wrote {plot_curves([result], png)}")
    return result


def baseline_label(sparsity: float) -> str:
    """What the baseline is: ``"the run's own model (dense)"`` or ``"the run's own model at
    sparsity 0.500"`` (the fraction of its prunable weights at 0)."""
    if sparsity == 0:
        return "the run's own model (dense)"
    return f"the run's own model at sparsity {sparsity:.3f}"


def knee_line(result: dict[str, Any]) -> str:
    """The printed line that states the knee and what it is relative to."""
    base, k, tol = result["baseline"], result["knee"], result["tolerance"]
    rel = (f"within {100 * tol:g}% (relative) of {base['label']} "
           f"({result['baseline_val_loss']:.4f} {result['unit']})")
    if k is None:
        return (f"knee (essential sparsity): none: no level that prunes weights the run kept "
                f"stays {rel}")
    removed = "" if k["removed_of_kept"] is None else (
        f"; it removes {100 * k['removed_of_kept']:.1f}% of the weights the run kept")
    return (f"knee (essential sparsity): {k['sparsity']:.3f} = the largest sparsity pruning "
            f"weights the run kept whose val loss is {rel}{removed}")


def _at(tree: Any, path: Sequence[Any]) -> Any:
    for k in path:
        tree = tree[getattr(k, "key", getattr(k, "idx", k))]
    return tree


def table(result: dict[str, Any]) -> str:
    """A plain-text table of one :func:`oneshot` result: loss ± SE at each level, against the
    baseline (the run's own model, the first row)."""
    base = result["baseline"]
    loss_head = f"val_loss ± SE ({result['unit']})"
    lines = [f"{'sparsity':>8} {'measured':>9} {loss_head:>24} {'vs baseline':>12}",
             f"{base['sparsity']:>8.3f} {base['sparsity']:>9.4f} "
             f"{evaluation.format_loss(base['val_loss'], base.get('val_loss_se')):>24} "
             f"{'baseline':>12}  {base['label']}"]
    for lv in result["levels"]:
        lines.append(f"{lv['sparsity']:>8.3f} {lv['measured_sparsity']:>9.4f} "
                     f"{evaluation.format_loss(lv['val_loss'], lv.get('val_loss_se')):>24} "
                     f"{100 * lv['relative_increase']:>+11.2f}%"
                     + ("" if lv["newly_pruned"] else "  prunes no weight the run kept"))
    lines.append(knee_line(result))
    return "\n".join(lines)


def plot_curves(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write :func:`curves_figure` of ``results`` to ``path`` (its suffix the format)."""
    path = Path(path)
    curves_figure(results).savefig(path, dpi=120)
    return path


def curves_figure(results: Sequence[dict[str, Any]]) -> Figure:
    """Loss vs sparsity of one or more :func:`oneshot` results (same run) in one figure: each
    curve, the baseline (the run's own model: its loss, and its sparsity when it has one),
    the tolerance band of the first result and each knee; the loss axis in the results'
    unit, the word the printed lines use."""
    first = results[0]
    base, tol = first["baseline"], first["tolerance"]
    loss = first["baseline_val_loss"]
    fig = Figure(figsize=(7.0, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.axhline(loss, color="black", lw=1, label=f"{base['label']}: {loss:.4f}")
    ax.axhspan(loss, loss + tol * abs(loss), color="grey", alpha=0.25,
               label=f"tolerance +{100 * tol:g}% of it")
    if base["sparsity"] > 0:
        ax.axvline(base["sparsity"], color="black", ls=":", lw=1,
                   label=f"the run's own sparsity {base['sparsity']:.3f}")
    for r in results:
        xs = [r["baseline"]["sparsity"]] + [lv["sparsity"] for lv in r["levels"]]
        ys = [r["baseline_val_loss"]] + [lv["val_loss"] for lv in r["levels"]]
        order = np.argsort(xs, kind="stable")
        name = f"{r['score']} ({r['structure']}, {r['allocation']})"
        (line,) = ax.plot(np.take(xs, order), np.take(ys, order), marker="o", ms=3, label=name)
        if r["knee"] is not None:
            ax.plot([r["knee"]["sparsity"]], [r["knee"]["val_loss"]], marker="*", ms=14,
                    color=line.get_color(), ls="none",
                    label=f"knee {r['score']}: {r['knee']['sparsity']:g}")
    ax.set_xlabel("sparsity (fraction of prunable weights removed)")
    ax.set_ylabel(loss_label("validation loss", first["unit"]))
    ax.set_title(f"one-shot pruning of {Path(first['run_dir']).name}, step {first['step']}; "
                 "knee relative to the run's own model", fontsize=10, wrap=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig
