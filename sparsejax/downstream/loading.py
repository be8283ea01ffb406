"""Load a run dir as a model: :func:`load` rebuilds the GPT from ``config.json`` and puts the
checkpoint's weights and masks on it, aligned exactly with the model's params tree.

The downstream half of SPDF (Thangarasa et al. 2023, "SPDF: Sparse Pre-training and Dense
Fine-tuning for Large Language Models"): a sparse pre-training run becomes the starting point
of a sparse (masks kept) or dense (every weight trains, pruned ones from 0) fine-tuning run.
Checkpoints restore without a target structure, so dict keys come back as strings (``'0'``
where ``nnx.to_pure_dict`` has the int ``0``) and NamedTuples as dicts; :func:`align` puts
every leaf back on the model's own tree and names any leaf that is missing, extra or of
another shape.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax import errors
from sparsejax.models.gpt import GPT
from sparsejax.paths import path_str
from sparsejax.run import build, checkpoint, configlib
from sparsejax.run.rundir import PathLike, RunDir, SweepDir
from sparsejax.run.spec import RunSpec


class Loaded(NamedTuple):
    """A run dir's model and what it was trained with."""

    model: GPT  # holds ``params``: the weights the run's forward pass computed with
    params: dict[str, Any]  # pure nested dict, the tree of nnx.to_pure_dict(nnx.state(model))
    masks: Any | None  # bool arrays on params' tree (scalar True on dense leaves); None: dense
    config: RunSpec  # the run's resolved config.json
    step: int  # the checkpoint's step


def _key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _by_path(tree: Any) -> dict[tuple[str, ...], Any]:
    return {tuple(_key(k) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def align(tree: Any, like: Any, what: str, *, scalars: bool = False) -> Any:
    """``tree``'s leaves on ``like``'s tree structure (its key types, order and containers),
    matched by path with every key compared as a string.

    Each leaf must have ``like``'s shape (``scalars=True`` also accepts a 0-d leaf, as masks
    hold on dense leaves). Raises :class:`~sparsejax.errors.InputError` (a ``ValueError``)
    naming every leaf that is missing, extra or of another shape (``what`` says whose leaves
    they are). ``like``'s leaves need only ``shape`` (arrays or ``jax.ShapeDtypeStruct``)."""
    given = _by_path(tree)
    out, problems = [], []
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    wanted = set()
    for path, ref in leaves:
        key = tuple(_key(k) for k in path)
        wanted.add(key)
        name = path_str(path)
        if key not in given:
            problems.append(f"{name}: missing")
            continue
        leaf = np.asarray(given[key])
        if leaf.shape != tuple(ref.shape) and not (scalars and leaf.ndim == 0):
            problems.append(f"{name}: shape {leaf.shape}, the model has {tuple(ref.shape)}")
            continue
        out.append(leaf)
    problems += [f"{'/'.join(k)}: not in the model" for k in sorted(set(given) - wanted)]
    if problems:
        raise errors.InputError(f"{what} do not match the model: " + "; ".join(problems))
    return treedef.unflatten(out)


def check_run_dir(path: PathLike, what: str = "run dir") -> RunDir:
    """``path`` as a :class:`RunDir` when it is a folder that is not a sweep's;
    :class:`~sparsejax.errors.MissingInputError` when it does not exist and
    :class:`~sparsejax.errors.InputError` when it is a sweep (or soup) dir or a folder of run
    dirs, naming one of its runs to load instead. ``what`` starts the messages (e.g.
    ``"export: run dir"``)."""
    run = RunDir(path)
    if not run.path.is_dir():
        raise errors.MissingInputError(f"{what} {run} does not exist")
    if run.config_file.exists():
        return run
    runs = sorted(p for p in run.path.iterdir() if RunDir(p).config_file.is_file())
    sweep = SweepDir(path)
    if runs or sweep.sweep_file.is_file() or sweep.soup_file.is_file():
        kind = ("a sweep dir" if sweep.sweep_file.is_file() else "a soup dir"
                if sweep.soup_file.is_file() else "a folder of run dirs")
        example = f"e.g. {runs[0]}" if runs else "none has started yet"
        raise errors.InputError(
            f"{what} {run} is {kind}, not a run dir: give one of its run dirs instead "
            f"({example}, {len(runs)} in all; `sparsejax status {run}` lists them)")
    return run


def read_config(run_dir: PathLike) -> RunSpec:
    """A run dir's stored config (:meth:`RunDir.read_config`) as a
    :class:`~sparsejax.run.spec.RunSpec`, keys added to the schema since the run was written at
    their defaults (:func:`sparsejax.run.configlib.stored_spec`);
    :class:`~sparsejax.errors.MissingInputError` (a ``FileNotFoundError``) naming the path when
    the run dir or its config is missing, :class:`~sparsejax.errors.InputError` naming the file
    when it is not a valid config."""
    run = check_run_dir(run_dir)
    config = run.read_config()
    if config is None:
        raise errors.MissingInputError(f"run dir {run} holds no config ({run.config_file})")
    return configlib.stored_spec(config, str(run.config_file))


def checkpoint_step(run_dir: PathLike, step: int | None = None) -> int:
    """``step`` if the run dir holds a checkpoint there, its latest when ``None`` (or -1);
    :class:`~sparsejax.errors.MissingInputError` naming the run dir and the steps it has
    otherwise."""
    run = RunDir(run_dir)
    steps = run.checkpoint_steps()
    if not steps:
        raise errors.MissingInputError(f"run dir {run} holds no checkpoint ({run.checkpoints})")
    if step is None or step == -1:
        return steps[-1]
    if step not in steps:
        raise errors.MissingInputError(f"run dir {run}: no checkpoint at step {step} (it has "
                                       f"{steps})")
    return int(step)


def build_model(config: RunSpec, vocab_size: int) -> GPT:
    """The run's GPT to put weights on: abstract (shapes only, no random init) for dense
    layers (a Sparse-IFT family's too: Thangarasa et al. 2023); BSR layers are built as
    training built them (same seed, so the same block layout, which is host data)."""
    cfg = build.model_config(config, vocab_size)
    linear = build.linear_factory(config)  # dense, kernels, or a Sparse-IFT family's layers
    if config.model.linear == "dense":
        return nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(config.seed), linear=linear))
    return GPT(cfg, rngs=nnx.Rngs(config.seed), linear=linear)


def _forward_weight(raw: dict[str, Any]) -> float:
    """Weight of pruned entries in the forward pass (MDGF's beta; 0 for hard masks)."""
    state = checkpoint.find_sparse_state(raw.get("opt_state"))
    if state is None or "forward_weight" not in state:
        return 0.0
    return float(np.asarray(state["forward_weight"]))


def load(run_dir: PathLike, *, step: int | None = None, dense: bool = False) -> Loaded:
    """The run's model, rebuilt from ``RUN_DIR/config.json`` with the weights of its latest
    checkpoint (or ``step``).

    The model computes exactly what training evaluated: for straight-through methods
    (STE, SR-STE, MDGF, ...) its weights are the forward weights ``W * (E + (1 - E) beta)``
    (:func:`sparsejax.forward_params`), for hard-mask methods the trained weights, whose
    pruned entries are exactly 0. ``masks`` sit on the params' own tree (int keys where the
    model has them), bool arrays on prunable leaves and scalar ``True`` elsewhere; ``None``
    for a dense run or with ``dense=True`` (SPDF's dense fine-tuning: every weight trains,
    pruned ones starting at 0). Runs on BSR layers (``model.linear='bsr'``) are sparse by
    construction and have no masks.

    Raises :class:`~sparsejax.errors.MissingInputError` (a ``FileNotFoundError``) for a
    missing run dir, config or checkpoint step and :class:`~sparsejax.errors.InputError` (a
    ``ValueError``) naming each leaf whose structure or shape does not match the model.
    """
    config = read_config(run_dir)
    step = checkpoint_step(run_dir, step)
    raw = checkpoint.load_raw(run_dir, step)
    if "params" not in raw:
        raise errors.InputError(f"run dir {run_dir}: checkpoint {step} holds no params")
    embed = _by_path(raw["params"]).get(("embed", "embedding"))
    if embed is None:
        raise errors.InputError(f"run dir {run_dir}: checkpoint {step} has no embed/embedding "
                                "leaf, so it is not a sparsejax GPT")
    model = build_model(config, vocab_size=int(np.shape(embed)[0]))
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    like = nnx.to_pure_dict(state)
    where = f"run dir {run_dir} (checkpoint {step})"
    params = align(raw["params"], like, f"{where}: params")
    for (path, p), ref in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                              jax.tree_util.tree_leaves(like), strict=True):
        if p.dtype != ref.dtype:
            raise errors.InputError(f"{where}: params {path_str(path)} is {p.dtype}, the "
                                    f"model holds {ref.dtype}")
    raw_masks = raw["masks"] if "masks" in raw else checkpoint.find_masks(raw.get("opt_state"))
    masks = None
    if raw_masks is not None:
        masks = align(raw_masks, like, f"{where}: masks", scalars=True)
        masks = jax.tree_util.tree_map(lambda m: np.asarray(m, bool), masks)
        beta = _forward_weight(raw)
        params = jax.tree_util.tree_map(
            lambda p, m: p if m.ndim == 0 else np.where(m, p, np.float32(beta) * p).astype(p.dtype),
            params, masks)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state, rest)
    return Loaded(model, params, None if dense else masks, config, step)


def load_for_finetuning(
    run_dir: PathLike, *, dense: bool = True, step: int | None = None
) -> tuple[dict[str, Any], Any | None]:
    """``(params, masks_or_None)`` of a (sparse) pre-training run, ready for a new optimizer:
    a thin form of :func:`sparsejax.load` (the params and masks of its :class:`Loaded`, on
    the model's own tree).

    SPDF (Thangarasa et al. 2023, "SPDF: Sparse Pre-training and Dense Fine-tuning"): with
    ``dense=True`` every weight becomes trainable again (pruned ones resume from exactly 0)
    and the masks are ``None``; with ``dense=False`` the masks come too, for
    ``methods.fixed`` (or set ``init_from`` and ``finetune.mode`` in a config instead).
    """
    loaded = load(run_dir, step=step, dense=dense)
    if not dense and loaded.masks is None:
        raise errors.InputError(f"{run_dir}: the checkpoint holds no masks (was it a dense "
                                "run?)")
    return loaded.params, loaded.masks
