"""Sparse Model Soups (Zimmer et al. 2023, "Sparse Model Soups: A Recipe for Improved Pruning
via Model Averaging").

Starting from one pruned model (``init_from``), ``soup.ingredients`` sparse fine-tuning runs
differ only in their seed (with a loaded model and no dropout, the seed decides the batch
order); they share the start's mask exactly (``finetune.mode="sparse"``, ``methods.fixed``),
so any average of them has exactly that mask too. Two soups per cycle:

* **uniform**: the mean of every ingredient;
* **greedy** (Wortsman et al. 2022): ingredients ordered by validation loss, best first; each
  next one joins only if the mean with it does not make the validation loss worse.

With ``soup.cycles > 1`` the chosen soup (``soup.select``) is pruned again, by global
magnitude, removing ``soup.prune_fraction`` of its remaining prunable weights, and a new cycle
fine-tunes and soups that (the paper's prune-retrain cycles). Every ingredient is an ordinary
run dir; every soup and pruned start is a run dir too (``config.json``, a weights-and-masks
checkpoint, ``summary.json``), so :func:`sparsejax.load` and ``sparsejax export`` take it.
Every ingredient and soup is scored by the training loop's own evaluation path
(:mod:`sparsejax.run.evaluation`) on the run's final evaluation set (``eval.final_batches``
windows of ``eval.batch_size`` x ``train.seq_len`` drawn with ``eval.seed``, never the run's
seed): the tokens each ingredient's own ``summary.json`` was scored on (same ``eval_sha256``).
Each records ``val_loss`` ± ``val_loss_se``, ``eval_sequences`` and ``eval_sha256``; the greedy
rule compares the mean losses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from sparsejax import errors
from sparsejax.downstream import loading
from sparsejax.run import checkpoint, data, evaluation, experiment
from sparsejax.run.rundir import RunDir, SweepDir
from sparsejax.run.spec import RunSpec


def average(trees: list[Any]) -> Any:
    """The entrywise mean of params trees (float32 accumulation, the leaves' dtype kept)."""
    if not trees:
        raise ValueError("average: no params to average")
    return jax.tree_util.tree_map(
        lambda *xs: (sum(np.asarray(x, np.float32) for x in xs) / len(xs)).astype(
            np.asarray(xs[0]).dtype), *trees)


def mask_sparsity(masks: Any) -> float:
    """Pruned fraction of the prunable entries (mask leaves that are arrays)."""
    arrays = [np.asarray(m) for m in jax.tree_util.tree_leaves(masks) if np.ndim(m)]
    return 1.0 - sum(int(m.sum()) for m in arrays) / sum(m.size for m in arrays)


def zeros_kept(params: Any, masks: Any) -> bool:
    """Every weight the masks prune is exactly 0."""
    return all(bool(np.all(np.asarray(p)[~np.asarray(m)] == 0))
               for p, m in zip(jax.tree_util.tree_leaves(params),
                               jax.tree_util.tree_leaves(masks), strict=True) if np.ndim(m))


def prune_more(params: Any, masks: Any, fraction: float) -> tuple[Any, Any]:
    """Remove ``fraction`` of the kept prunable weights, smallest ``|w|`` first over all
    prunable leaves together (global magnitude, Zhu & Gupta 2017); exact count
    ``round(fraction * kept)``, ties broken towards the lower flat index."""
    p_leaves, treedef = jax.tree_util.tree_flatten(params)
    m_leaves = treedef.flatten_up_to(masks)
    idx = [i for i, m in enumerate(m_leaves) if np.ndim(m)]
    mags = np.concatenate([np.where(np.asarray(m_leaves[i]), np.abs(np.asarray(
        p_leaves[i], np.float32)), np.inf).ravel() for i in idx])
    kept = int(np.isfinite(mags).sum())
    n_drop = round(fraction * kept)
    order = np.argsort(mags, kind="stable")[:n_drop]
    drop = np.zeros(mags.size, bool)
    drop[order] = True
    new_p, new_m, start = list(p_leaves), list(m_leaves), 0
    for i in idx:
        size = np.size(m_leaves[i])
        d = drop[start:start + size].reshape(np.shape(m_leaves[i]))
        new_m[i] = np.asarray(m_leaves[i]) & ~d
        new_p[i] = np.where(new_m[i], np.asarray(p_leaves[i]), 0).astype(np.asarray(
            p_leaves[i]).dtype)
        start += size
    return treedef.unflatten(new_p), treedef.unflatten(new_m)


class Evaluator:
    """Scores params of ``model``'s architecture on the config's final evaluation set (the
    training loop's: ``eval.final_batches``, ``eval.batch_size``, ``train.seq_len``,
    ``eval.seed``), compiled once: ``Evaluator(model, config, corpus)(params)`` is an
    :class:`sparsejax.run.evaluation.EvalResult` (loss, SE, sequences, fingerprint)."""

    def __init__(self, model: nnx.Module, config: RunSpec,
                 corpus: data.Corpus):
        self.eval_set = evaluation.eval_set(
            corpus.val, batch_size=config.eval.batch_size, seq_len=config.train.seq_len,
            n_batches=config.eval.final_batches, seed=config.eval.seed)
        self._per_sequence = evaluation.sequence_losses(model)

    def __call__(self, params: Any) -> evaluation.EvalResult:
        return evaluation.evaluate(self._per_sequence, params, self.eval_set)


def _write_soup(run_dir: Path, config: RunSpec, params: Any, masks: Any,
                summary: dict[str, Any]) -> None:
    run = RunDir(run_dir).create()
    run.write_config(config.to_dict())
    if run.latest_checkpoint_step() is None:
        checkpoint.save_weights(run, 0, params, masks)
    run.write_summary({"status": "completed", "step": 0, **summary})


def check(config: ml_collections.ConfigDict | RunSpec) -> RunSpec:
    """A soup needs a sparse start to fine-tune with its mask kept; returns the spec."""
    config = experiment.spec_of(config)
    if not config.init_from:
        raise errors.ConfigError("config init_from: a soup fine-tunes a pruned run; set "
                                 "init_from to its run dir")
    if config.finetune.mode != "sparse":
        raise errors.ConfigError(f"config finetune.mode must be 'sparse' for a sparse model soup "
                                 f"(the ingredients share the start's mask), got "
                                 f"{config.finetune.mode!r}")
    experiment.check(config)
    return config


def soup(config: ml_collections.ConfigDict | RunSpec, workdir: str | Path, *, progress: bool = False
         ) -> dict[str, Any]:
    """Run every cycle (ingredients, uniform and greedy soup, optional re-pruning) in
    ``workdir``; returns (and writes ``WORKDIR/soup.json``) the losses and sparsities.

    Completed ingredient runs and soups are reused, so running it again resumes."""
    config = check(config)
    workdir = SweepDir(workdir).create().path
    corpus = data.load_spec(config.data)
    start_dir, start_step = Path(config.init_from), config.init_from_step
    cycles = []
    evaluate = None
    for k in range(config.soup.cycles):
        cdir = workdir / f"cycle{k}"
        ingredients = []
        for i in range(config.soup.ingredients):
            c = config.replace(init_from=str(start_dir), init_from_step=start_step,
                               seed=config.seed + i)
            run_dir = cdir / f"ingredient{i}"
            experiment.run(c, str(run_dir), progress=progress)
            loaded = loading.load(run_dir)
            if evaluate is None:
                evaluate = Evaluator(loaded.model, config, corpus)
            scored = evaluate(loaded.params)
            ingredients.append(dict(run_dir=str(run_dir), seed=c.seed, params=loaded.params,
                                    masks=loaded.masks, scored=scored, val_loss=scored.loss))
        masks = ingredients[0]["masks"]
        sparsity = mask_sparsity(masks)
        for ing in ingredients:
            same = jax.tree_util.tree_all(jax.tree_util.tree_map(
                lambda a, b: bool(np.array_equal(a, b)), ing["masks"], masks))
            if not same or not zeros_kept(ing["params"], masks):
                raise ValueError(f"soup: {ing['run_dir']} does not keep the start's mask")
        uniform = average([ing["params"] for ing in ingredients])
        ranked = sorted(ingredients, key=lambda ing: ing["val_loss"])
        members, greedy, best = [ranked[0]], ranked[0]["params"], ranked[0]["scored"]
        for ing in ranked[1:]:
            candidate = average([m["params"] for m in [*members, ing]])
            scored = evaluate(candidate)
            if scored.loss <= best.loss:  # the mean loss decides
                members, greedy, best = [*members, ing], candidate, scored
        result = dict(cycle=k, start=str(start_dir), sparsity=sparsity,
                      ingredients=[{"run_dir": ing["run_dir"], "seed": ing["seed"],
                                    **evaluation.summary_fields(ing["scored"])}
                                   for ing in ingredients],
                      best_ingredient=ranked[0]["val_loss"])
        ing_config = loading.read_config(ingredients[0]["run_dir"])
        for name, params, members_ in (("uniform", uniform, ingredients),
                                       ("greedy", greedy, members)):
            if not zeros_kept(params, masks):
                raise ValueError(f"soup: the {name} soup lost the mask")  # cannot happen
            scored = evaluate(params) if name == "uniform" else best
            entry = dict(**evaluation.summary_fields(scored), sparsity=mask_sparsity(masks),
                         members=[m["run_dir"] for m in members_], run_dir=str(cdir / name))
            _write_soup(cdir / name, ing_config, params, masks,
                        {**evaluation.summary_fields(scored), "final_val_loss": scored.loss,
                         "sparsity": entry["sparsity"], "soup": name,
                         "members": entry["members"]})
            result[name] = entry
        cycles.append(result)
        if k + 1 < config.soup.cycles:  # prune the chosen soup again and fine-tune that
            chosen = uniform if config.soup.select == "uniform" else greedy
            params, new_masks = prune_more(chosen, masks, config.soup.prune_fraction)
            start_dir, start_step = workdir / f"cycle{k + 1}" / "start", -1
            _write_soup(start_dir, ing_config, params, new_masks,
                        {"sparsity": mask_sparsity(new_masks), "soup": "pruned start",
                         "from": str(cdir / config.soup.select)})
    out = {"cycles": cycles}
    SweepDir(workdir).write_soup(out)
    return out


def table(result: dict[str, Any]) -> str:
    """Plain text: per cycle, sparsity and the validation loss ± SE of each ingredient and
    soup."""
    lines = [f"{'cycle':>5} {'sparsity':>8} {'model':<14} {'val_loss ± SE':>17}"]
    for c in result["cycles"]:
        rows = [(f"ingredient{i}", ing) for i, ing in enumerate(c["ingredients"])]
        rows += [("best ingr.", min(c["ingredients"], key=lambda ing: ing["val_loss"])),
                 ("uniform soup", c["uniform"]),
                 (f"greedy ({len(c['greedy']['members'])})", c["greedy"])]
        lines += [f"{c['cycle']:>5} {c['sparsity']:>8.4f} {name:<14} "
                  f"{evaluation.format_loss(r['val_loss'], r.get('val_loss_se')):>17}"
                  for name, r in rows]
    return "\n".join(lines)
