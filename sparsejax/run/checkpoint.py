"""Checkpoints: orbax ``CheckpointManager`` over the whole training state, and loading for
downstream use (fine-tuning, export).

A checkpoint holds the loop's ``TrainState``: ``step, params, opt_state, rng, n_avg, flops,
loss_sum, loss_count``,
params as a pure nested dict (``nnx.to_pure_dict``), the optimizer state with its masks. Saves
copy to host first, so donated device buffers are never read after the step that donates them.
Each save records a SHA-256 of the saved arrays in the step's metadata; resuming
(:func:`restore_newest`) checks it and falls back past damaged checkpoints, and loading
(:func:`load_raw`, so :func:`sparsejax.load`, export, one-shot and ``init_from``) refuses a
damaged one (:class:`DamagedCheckpoint`).

Sharded states (:mod:`sparsejax.run.distributed`) restore onto the shardings of the ``like``
state, so a checkpoint saved on one mesh resumes on another. When this process does not hold
every shard (several hosts), the state is saved as sharded ``jax.Array`` s (each process
writes its shards) and checked with :func:`fingerprint`, a checksum reduced across devices
(every save records one), instead of the SHA-256 that would need the whole state on one host.

Steps a killed process left half-written (orbax's ``STEP.orbax-checkpoint-tmp`` folders) are
removed, with a warning naming them, when a run resumes; a save that fails is
:mod:`sparsejax.run.saving`'s.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sparsejax import checks, errors, packing
from sparsejax.radix import _flat_position
from sparsejax.run.rundir import PathLike, RunDir
from sparsejax.transforms import SparsifyState

PARTIAL = ".orbax-checkpoint-tmp"  # in the name of a step folder orbax has not committed


def manager(run_dir: PathLike, *, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager on the run dir's checkpoints (:attr:`RunDir.checkpoints`) keeping
    the last ``keep`` checkpoints."""
    checks.integer("keep", keep, 1)
    directory = RunDir(run_dir).checkpoints.absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    return ocp.CheckpointManager(directory, options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())


def _addressable(tree: Any) -> bool:
    return all(getattr(x, "is_fully_addressable", True) for x in jax.tree_util.tree_leaves(tree))


def save(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Save ``state`` at ``step`` (host copy when this process holds all of it; the write
    itself may finish asynchronously). Records :func:`digest` (when the state is on this
    host) and :func:`fingerprint`."""
    if _addressable(state):
        host = jax.device_get(state)
        meta = {"sha256": digest(host), "fingerprint": fingerprint(host)}
        mngr.save(int(step), args=ocp.args.StandardSave(host), custom_metadata=meta)
    else:  # orbax copies the shards to host before returning (donation-safe)
        mngr.save(int(step), args=ocp.args.StandardSave(state),
                  custom_metadata={"fingerprint": fingerprint(state)})


def _words(x: Any, xp: Any) -> Any:
    """The leaf's bits as uint32 words, one per entry (itemsize <= 4); ``xp``: numpy or
    ``jax.numpy``."""
    x = xp.asarray(x)
    if x.dtype == np.bool_:
        return x.astype(np.uint32)
    size = np.dtype(x.dtype).itemsize
    if size > 4:
        raise ValueError(f"fingerprint: {x.dtype} leaves are not supported (itemsize > 4)")
    uint = {1: np.uint8, 2: np.uint16, 4: np.uint32}[size]
    bits = x.view(uint) if xp is np else jax.lax.bitcast_convert_type(x, uint)
    return bits.astype(np.uint32)


def _leaf_sums(x: Any, xp: Any = np) -> Any:
    """Two position-weighted uint32 sums (mod 2**32) of a leaf's words: exact integer
    reductions, so any sharding gives the same value, and any one changed word changes the
    first sum (its weight ``2 p + 1`` is odd, hence invertible mod 2**32). Same values with
    ``xp=numpy`` (host) and ``xp=jax.numpy`` (sharded arrays, reduced on their devices)."""
    w = _words(x, xp)
    u = np.uint32
    pos = (np.arange(w.size, dtype=u).reshape(w.shape) if xp is np
           else _flat_position(w.shape, 0))
    rot = pos % u(31) + u(1)
    mixed = (w << rot) | (w >> (u(32) - rot))
    return xp.stack([xp.sum(w * (pos * u(2) + u(1)), dtype=u),
                     xp.sum(mixed ^ (pos * u(0x9E3779B9)), dtype=u)])


_device_leaf_sums = jax.jit(functools.partial(_leaf_sums, xp=jnp))


def fingerprint(tree: Any) -> str:
    """A checksum of ``tree`` (paths, dtypes, shapes, and per-leaf :func:`_leaf_sums`) that
    sharded arrays reduce on their devices: the same for a state and its host copy, on any
    mesh."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for name, leaf in sorted(((_path_name(p), leaf) for p, leaf in leaves), key=lambda t: t[0]):
        host = isinstance(leaf, np.ndarray | np.generic) or getattr(leaf, "ndim", 0) == 0
        sums = np.asarray(jax.device_get(_leaf_sums(np.asarray(leaf)) if host
                                         else _device_leaf_sums(leaf)))
        h.update(f"{name}:{np.dtype(leaf.dtype).str}{tuple(np.shape(leaf))}".encode())
        h.update(sums.astype("<u4").tobytes())
    return h.hexdigest()


def digest(tree: Any) -> str:
    """SHA-256 over the leaves' paths, dtypes, shapes and bytes, in path order, so a state and
    its raw (dict-shaped) restore give the same digest."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for name, leaf in sorted(((_path_name(p), leaf) for p, leaf in leaves), key=lambda t: t[0]):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{name}:{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _path_name(path: tuple[Any, ...]) -> str:
    parts = (getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))) for k in path)
    return "/".join(str(p) for p in parts)


def restore(mngr: ocp.CheckpointManager, like: Any, step: int | None = None) -> Any:
    """Restore the checkpoint at ``step`` (default: latest) into the structure of ``like``."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise errors.MissingInputError(f"no checkpoint in {mngr.directory}")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_newest(run_dir: PathLike, like: Any, *, keep: int = 3) -> tuple[Any, int] | None:
    """Restore the newest checkpoint of ``run_dir`` that restores and matches its checksum.

    Returns ``(state, step)``, or ``None`` when the run dir holds no committed checkpoint
    (a run killed before its first save starts again from step 0). Step folders a killed
    process left half-written are removed first, with a warning naming them. Newer damaged
    checkpoints (unreadable, or data that does not match the checksum recorded at save) are
    moved to :attr:`RunDir.damaged_checkpoints` with a warning naming them, so training can
    save those steps again. When none restores, raises :class:`~sparsejax.errors.InputError`
    naming the run dir.
    """
    run = RunDir(run_dir)
    if not run.checkpoints.is_dir():
        return None
    _remove_partial(run)
    mngr = _listing_manager(run_dir, keep=keep)
    steps = sorted(mngr.all_steps(), reverse=True)
    mngr.close()
    if not steps:
        return None
    skipped: list[tuple[int, str]] = []
    for step in steps:
        mngr = manager(run_dir, keep=keep, create=False)  # a failed restore can spoil a manager
        try:
            state = restore(mngr, like, step)
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            skipped.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
            continue
        finally:
            mngr.close()
        recorded = _recorded_digest(run_dir, step)
        if "sha256" in recorded and _addressable(state):
            ok = digest(state) == recorded["sha256"]
        elif "fingerprint" in recorded:
            ok = fingerprint(state) == recorded["fingerprint"]
        else:
            warnings.warn(f"checkpoint {step} of {run_dir} records no checksum; restored "
                          "without verifying its data", stacklevel=2)
            ok = True
        if not ok:
            skipped.append((step, "data does not match the checksum recorded at save"))
            continue
        break
    else:
        why = "; ".join(f"step {s}: {r}" for s, r in skipped)
        raise errors.InputError(f"run dir {run_dir}: no checkpoint restores ({why})")
    if skipped and jax.process_index() == 0:  # one process moves them
        damaged = run.damaged_checkpoints
        damaged.mkdir(exist_ok=True)
        for s, _ in skipped:
            src = run.checkpoints.absolute() / str(s)
            dst = damaged / str(s)
            n = 1
            while dst.exists():
                dst, n = damaged / f"{s}.{n}", n + 1
            shutil.move(src, dst)
        warnings.warn(
            f"run dir {run_dir}: skipped damaged checkpoint(s) "
            + "; ".join(f"step {s} ({r})" for s, r in skipped)
            + f"; moved to {damaged}; resuming from step {step}", stacklevel=2)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("sparsejax-restore")
    return state, step


def _remove_partial(run: RunDir) -> None:
    """Remove the step folders orbax never committed (a save cut by a kill), with a warning
    naming them (process 0; the others wait)."""
    if jax.process_index() == 0:
        partial = sorted(p for p in run.checkpoints.iterdir()
                         if PARTIAL in p.name and p.name.partition(".")[0].isdigit())
        for path in partial:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        if partial:
            warnings.warn(f"run dir {run}: removed checkpoint(s) a stopped process left "
                          f"half-written: {', '.join(p.name for p in partial)}", stacklevel=3)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("sparsejax-partial-checkpoints")


def _recorded_digest(run_dir: PathLike, step: int) -> dict[str, str]:
    """The checksums recorded at save (``sha256`` and/or ``fingerprint``; may be empty)."""
    mngr = manager(run_dir, create=False)
    try:
        meta = mngr.metadata(step).custom_metadata or {}
        return {k: meta[k] for k in ("sha256", "fingerprint") if k in meta}
    except Exception:  # a missing or unreadable _CHECKPOINT_METADATA: nothing recorded
        return {}
    finally:
        mngr.close()


def latest_step(run_dir: PathLike) -> int | None:
    """The latest committed checkpoint step of a run dir, or ``None``
    (:meth:`RunDir.latest_checkpoint_step`)."""
    return RunDir(run_dir).latest_checkpoint_step()


class DamagedCheckpoint(errors.InputError):
    """A checkpoint whose data cannot be read or does not match the checksum recorded when it
    was saved (a changed or damaged file): refused, never loaded silently."""


def load_raw(run_dir: PathLike, step: int | None = None) -> dict[str, Any]:
    """The checkpoint as saved, without a target structure (NamedTuples come back as dicts),
    verified against the checksum recorded at save (:func:`verify`).

    Enough to read ``params`` and the masks for export and inspection. Raises
    :class:`~sparsejax.errors.MissingInputError` when the run dir holds no checkpoint and
    :class:`DamagedCheckpoint` (an :class:`~sparsejax.errors.InputError`) naming the run dir,
    the step and the steps to load instead when the checkpoint cannot be read or its data does
    not match its recorded SHA-256 (or fingerprint, for sharded saves).
    """
    step = RunDir(run_dir).latest_checkpoint_step() if step is None else step
    if step is None:
        raise errors.MissingInputError(f"no checkpoint in {RunDir(run_dir).checkpoints}")
    mngr = _listing_manager(run_dir)
    try:
        raw = _restore_raw(mngr, run_dir, step)
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise DamagedCheckpoint(_damaged(run_dir, step, f"cannot be read ({_first_line(e)})")
                                ) from None
    finally:
        mngr.close()
    verify(run_dir, step, raw)
    return raw


def _listing_manager(run_dir: PathLike, keep: int = 3) -> ocp.CheckpointManager:
    """:func:`manager` over existing checkpoints; :class:`DamagedCheckpoint` naming the run
    dir when orbax cannot list them (it reads every step's metadata: one damaged step stops
    it listing any)."""
    try:
        return manager(run_dir, keep=keep, create=False)
    except Exception as e:  # orbax raises many types for a damaged metadata file
        raise DamagedCheckpoint(
            f"run dir {run_dir}: its checkpoints cannot be listed ({_first_line(e)}): a step's "
            f"metadata is damaged; move the damaged step folder out of "
            f"{RunDir(run_dir).checkpoints}") from None


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _restore_raw(mngr: ocp.CheckpointManager, run_dir: PathLike, step: int) -> Any:
    meta = _sharded_metadata(run_dir, step)
    if meta is None:  # saved from host arrays
        return mngr.restore(step, args=ocp.args.StandardRestore())
    # saved as sharded arrays (several hosts): onto this process's first device
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    return jax.device_get(mngr.restore(step, args=ocp.args.StandardRestore(target)))


def _damaged(run_dir: PathLike, step: int, reason: str) -> str:
    others = [s for s in RunDir(run_dir).checkpoint_steps() if s != step]
    fix = (f"load another step with step=N (it has {others})" if others
           else "it has no other checkpoint; retrain or restore the run dir from a backup")
    return f"run dir {run_dir}: checkpoint {step} {reason}; {fix}"


def verify(run_dir: PathLike, step: int, raw: Any) -> None:
    """Check a restored checkpoint against the checksum recorded at save: its SHA-256
    (:func:`digest`) when recorded, else its :func:`fingerprint`; :class:`DamagedCheckpoint`
    when it differs. A checkpoint that records neither (written before checksums) loads with
    a warning saying it was not verified."""
    recorded = _recorded_digest(run_dir, step)
    if "sha256" in recorded:
        ok = digest(raw) == recorded["sha256"]
        what = "SHA-256"
    elif "fingerprint" in recorded:
        ok = fingerprint(raw) == recorded["fingerprint"]
        what = "fingerprint"
    else:
        warnings.warn(f"run dir {run_dir}: checkpoint {step} records no checksum; loaded "
                      "without verifying its data", stacklevel=3)
        return
    if not ok:
        raise DamagedCheckpoint(_damaged(
            run_dir, step, f"does not match the {what} recorded when it was saved (a file "
            "under it was changed or damaged)"))


def _sharded_metadata(run_dir: PathLike, step: int) -> Any | None:
    """The checkpoint's array metadata when it was saved from sharded ``jax.Array`` s (their
    device mesh recorded), else ``None``."""
    directory = RunDir(run_dir).checkpoints.absolute()
    mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                 item_handlers=ocp.StandardCheckpointHandler())
    try:
        meta = mngr.item_metadata(step)
    finally:
        mngr.close()
    leaves = jax.tree_util.tree_leaves(meta)
    return meta if any(getattr(m, "sharding", None) is not None for m in leaves) else None


def find_sparse_state(opt_state: Any) -> Any | None:
    """The sparsify state (a ``SparsifyState``, or its raw dict) inside an optimizer state."""
    if isinstance(opt_state, SparsifyState):
        return opt_state
    if isinstance(opt_state, dict):
        if {"count", "masks", "key", "method_state", "inner_state"} <= set(opt_state):
            return opt_state
        children = opt_state.values()
    elif isinstance(opt_state, list | tuple):
        children = opt_state
    else:
        return None
    for child in children:
        found = find_sparse_state(child)
        if found is not None:
            return found
    return None


def find_masks(opt_state: Any) -> Any | None:
    """The masks inside a raw (dict-shaped) or structured optimizer state, if any (bool;
    unpacked when the run stored them packed, ``sparsity.packed_masks``)."""
    state = find_sparse_state(opt_state)
    if state is None:
        return None
    return packing.bool_masks(state.masks if hasattr(state, "masks") else state["masks"])


def save_weights(run_dir: PathLike, step: int, params: Any, masks: Any | None = None) -> None:
    """Write a checkpoint holding only ``{"step", "params"[, "masks"]}`` (e.g. a model soup),
    which :func:`sparsejax.load` reads like a training checkpoint."""
    state = {"step": np.int32(step), "params": params}
    if masks is not None:
        state["masks"] = masks
    mngr = manager(run_dir, keep=1)
    try:
        save(mngr, step, state)
        mngr.wait_until_finished()
    finally:
        mngr.close()
