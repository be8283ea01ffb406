"""The training loop: one jitted step with donated buffers, periodic eval, logs, checkpoints.

Reads top to bottom: split the model into a graph and a pure params dict, init the optimizer,
restore the latest checkpoint if the run dir has one, then loop. Batches are a pure function
of ``(seed, step)`` and all running statistics (N_avg, FLOPs, the train-loss window) live in
the checkpointed :class:`TrainState`, so a run killed at any point and started again with the
same arguments ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparsejax import checks
from sparsejax.models.gpt import GPT, cross_entropy, loss_fn
from sparsejax.run import accounting, checkpoint, configlib, data, distributed, evaluation, rundir
from sparsejax.state import (
    SparsityStats,
    check,
    find_state,
    forward_params,
    prune,
    violations_report,
)
from sparsejax.state import sparsity_stats as _sparsity_stats


class TrainState(NamedTuple):
    step: jax.Array  # shape=(), int32: completed steps
    params: Any  # pure nested dict of arrays (nnx.to_pure_dict of the model's Params)
    opt_state: Any  # optimizer state (holds the masks for sparse runs)
    rng: jax.Array  # shape=(2,), uint32: base key; step t uses fold_in(rng, t)
    n_avg: jax.Array  # shape=(), float32: mean active params over completed steps
    flops: jax.Array  # shape=(), float32: cumulative training FLOPs (3x forward)
    loss_sum: jax.Array  # shape=(), float32: train-loss sum since the last log
    loss_count: jax.Array  # shape=(), int32: steps in that sum


def _flops_coefficients(model: GPT, seq_len: int) -> tuple[float, float]:
    """Per-token training FLOPs = fixed + dense_part * density (DESIGN.md "Accounting"), read
    off the model's layers (Sparse-IFT and kernel-sparse layers counted as built)."""
    fixed, maskable = accounting.forward_flops_coefficients(model, seq_len)
    return 3.0 * fixed, 3.0 * maskable


def _sparse_state(opt_state: Any):
    """The optimizer's SparsifyState, or None for a dense optimizer."""
    try:
        return find_state(opt_state)
    except ValueError as err:
        if "no sparsify state" in str(err):
            return None
        raise  # a composition that cannot keep the zeros: refuse before training


def _is_sparse(tx: optax.GradientTransformation, params: Any) -> bool:
    """Whether ``tx``'s state holds masks (traced abstractly: nothing is computed)."""
    found: list[bool] = []
    jax.eval_shape(lambda p: found.append(_sparse_state(tx.init(p)) is not None), params)
    return found[0]


def merge_model(graphdef, params_def, rest, params) -> GPT:
    """The model of ``nnx.split(model, nnx.Param, ...)`` with ``params`` (a pure dict on the
    params' tree) as its weights; traceable, for jitted steps."""
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(params_def, jax.tree.leaves(params)),
                     rest)


def make_train_step(graphdef, params_def, rest, tx, *, fixed_flops, dense_flops,
                    tokens_per_step, sparse: bool, structural: SparsityStats, loss=None,
                    shardings: tuple[Any, Any] | None = None):
    """The jitted step ``(state, inputs_BxL, targets_BxL[, loss_aux]) -> (state, metrics)``;
    ``state`` is donated. ``loss(model, x_BxL, y_BxL, loss_aux)`` replaces the cross-entropy
    as the training objective when given (e.g. :func:`sparsejax.run.distill.squarehead_loss`).
    Sparsity, counts and the target come from the optimizer state
    (:func:`sparsejax.sparsity_stats`, the single source of truth); ``structural`` stands in
    when the optimizer holds no masks (dense runs, and layers that are sparse by construction:
    :func:`accounting.structural_stats`). ``shardings``: ``(state, batch)`` shardings
    (:mod:`sparsejax.run.distributed`); the state keeps its sharding across steps."""

    def loss_of(params, x_BxL, y_BxL, aux):
        model = merge_model(graphdef, params_def, rest, params)
        return loss_fn(model, x_BxL, y_BxL) if loss is None else loss(model, x_BxL, y_BxL, aux)

    def step(state: TrainState, x_BxL, y_BxL, aux=None):
        def loss_of_weights(params):  # straight-through forward weights for sparse runs
            return loss_of(forward_params(params, state.opt_state) if sparse else params,
                           x_BxL, y_BxL, aux)

        loss, grads = jax.value_and_grad(loss_of_weights)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        stats = _sparsity_stats(opt_state, params) if sparse else structural
        n_active = jnp.asarray(stats.n_active, jnp.float32)
        density = 1.0 - stats.sparsity
        new = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            rng=state.rng,
            n_avg=accounting.n_avg_update(state.n_avg, n_active, state.step.astype(jnp.float32)),
            flops=state.flops + tokens_per_step * (fixed_flops + dense_flops * density),
            loss_sum=state.loss_sum + loss,
            loss_count=state.loss_count + 1,
        )
        return new, {"n_active": n_active, "density": density,
                     "target_sparsity": stats.target_sparsity}

    if shardings is None:
        return jax.jit(step, donate_argnums=0)
    state_sh, batch_sh = shardings
    replicated = distributed.replicated(batch_sh.mesh)  # metrics, and loss_aux (a teacher)
    return jax.jit(step, donate_argnums=0,
                   in_shardings=(state_sh, batch_sh, batch_sh, replicated),
                   out_shardings=(state_sh, replicated))


def make_eval_step(graphdef, params_def, rest):
    """Mean loss over stacked batches ``(n, B, L)``, one compiled call."""

    def evaluate(params, xs_NxBxL, ys_NxBxL):
        model = merge_model(graphdef, params_def, rest, params)
        losses = jax.lax.map(lambda xy: loss_fn(model, xy[0], xy[1]), (xs_NxBxL, ys_NxBxL))
        return jnp.mean(losses)

    return jax.jit(evaluate)


def make_sequence_losses(graphdef, params_def, rest, mesh: jax.sharding.Mesh | None = None):
    """Per-sequence mean losses of one batch ``(B, L) -> (B,)`` float32, one compiled shape
    for any number of batches (:mod:`sparsejax.run.evaluation` averages them and gives their
    standard error). With a ``mesh``, host batches are split over it
    (:func:`sparsejax.run.distributed.put`) and the losses come back replicated, so every process
    can read them."""

    def per_sequence(params, x_BxL, y_BxL):
        logits_BxLxV = merge_model(graphdef, params_def, rest, params)(x_BxL)
        return jax.vmap(lambda lg, y: cross_entropy(lg[None], y[None]))(logits_BxLxV, y_BxL)

    if mesh is None:
        return jax.jit(per_sequence)
    batch_sh = distributed.batch_sharding(mesh)
    losses = jax.jit(per_sequence, out_shardings=distributed.replicated(mesh))
    return lambda params, x_BxL, y_BxL: losses(params, distributed.put(x_BxL, batch_sh),
                                               distributed.put(y_BxL, batch_sh))


def _check_config_matches(run_dir: Path, config: dict[str, Any] | None) -> None:
    path = run_dir / "config.json"
    if config is None:
        return
    if path.exists():
        diff = configlib.differing_keys(json.loads(path.read_text()),
                                        json.loads(json.dumps(config)))
        if diff:  # logging and placement keys (wandb.*, mesh.*) may change on resume
            raise ValueError(
                f"workdir {run_dir} holds a run with a different config (keys {diff}); "
                "use a new --workdir or the same config to resume"
            )
    elif any((run_dir / checkpoint.CHECKPOINT_DIR).glob("*")):
        raise ValueError(
            f"workdir {run_dir} holds checkpoints but no config.json, so it cannot tell "
            "whether they belong to this config; restore config.json or use a new --workdir"
        )
    else:
        rundir.write_json(path, config)


class _DeferredInterrupt:
    """While training, the first SIGINT only sets a flag that :meth:`check` turns into a
    ``KeyboardInterrupt`` at the next step boundary, so an asynchronous checkpoint save is
    never interrupted midway (its thread would print a traceback and leave a partial step);
    a second SIGINT interrupts at once. Only installed in the main thread."""

    def __init__(self) -> None:
        self.pending = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def _holding_run_lock(fn):
    """Run ``fn(model, tx, corpus, workdir, ...)`` holding the run dir's lock file."""

    @functools.wraps(fn)
    def locked(model, tx, corpus, workdir, **kwargs):
        Path(workdir).mkdir(parents=True, exist_ok=True)
        if not distributed.is_main():  # process 0 holds the lock for the whole job
            return fn(model, tx, corpus, workdir, **kwargs)
        with rundir.RunLock(Path(workdir)):
            return fn(model, tx, corpus, workdir, **kwargs)

    return locked


@_holding_run_lock
def run(
    model: GPT,
    tx: optax.GradientTransformation,
    corpus: data.Corpus,
    workdir: str | Path,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    lr_schedule: optax.Schedule | None = None,
    eval_every: int = 100,
    eval_batches: int = 4,
    eval_batch_size: int | None = None,
    final_eval_batches: int | None = None,
    eval_seed: int = 0,
    log_every: int = 10,
    checkpoint_every: int = 100,
    keep_checkpoints: int = 3,
    config: dict[str, Any] | None = None,
    wandb: dict[str, Any] | None = None,
    progress: bool = True,
    loss: Any = None,
    loss_aux: Any = None,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
    """Train ``model`` with ``tx`` on ``corpus`` for ``steps`` steps; returns the summary.

    The run dir ``workdir`` receives ``config.json`` (``config``, when given), ``metrics.jsonl``,
    ``summary.json`` and ``checkpoints/``. If it already holds checkpoints, training resumes
    from the latest one (the config must match). Sparsity, its target and the parameter
    counts are read from the optimizer state (:func:`sparsejax.sparsity_stats`), or from the
    model's layers when they are sparse by construction (BSR kernels); right after ``tx.init``
    the params are pruned with :func:`sparsejax.prune`, so step 0 already runs sparse. At
    every log step :func:`sparsejax.check` must find every pruned weight at 0, else the run
    fails naming the leaves.
    ``wandb``: ``{"enabled": bool, "project": str, "mode": "offline"|"online", "name": str,
    "group": str}``.
    ``loss(model, x_BxL, y_BxL, loss_aux)``: the training objective instead of the
    cross-entropy (``train_loss`` logs it; ``val_loss`` stays the cross-entropy).

    ``mesh``: the ``(data, fsdp)`` device mesh (:func:`sparsejax.run.distributed.make_mesh`;
    default: every device on ``data``). Params, masks and optimizer state are sharded over
    ``fsdp``, batches over both axes; with several processes (``jax.distributed``) only
    process 0 writes the run dir's files and holds its lock.

    Evaluation (:mod:`sparsejax.run.evaluation`): every ``eval_every`` steps on ``eval_batches``
    validation batches, and at the last step on ``final_eval_batches`` (default
    ``eval_batches``), both drawn with ``eval_seed``, never ``seed``, so every run of a sweep is
    scored on the same tokens. The final score is the summary's ``val_loss`` (and
    ``final_val_loss``) with its standard error ``val_loss_se``, the number of sequences
    ``eval_sequences`` and the tokens' fingerprint ``eval_sha256``.

    A process holds ``RUN_DIR/lock`` while it trains (a second one raises
    :class:`rundir.RunDirBusyError`). A finished run (``completed`` or ``diverged``) is
    returned as found. The run stops at the first log step whose loss is not finite, with
    status ``diverged``; ``KeyboardInterrupt`` leaves status ``interrupted`` at the last
    checkpoint's step and propagates. ``wall_time_s`` adds up over resumptions.
    """
    checks.positive_ints(steps=steps, batch_size=batch_size, seq_len=seq_len,
                         eval_every=eval_every, eval_batches=eval_batches, log_every=log_every,
                         checkpoint_every=checkpoint_every,
                         final_eval_batches=final_eval_batches or eval_batches)
    checks.integer("eval_seed", eval_seed, minimum=0)
    if seq_len > model.cfg.n_ctx:
        raise ValueError(f"seq_len ({seq_len}) must be <= the model's n_ctx ({model.cfg.n_ctx})")
    run_dir = Path(workdir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh = distributed.make_mesh() if mesh is None else mesh
    distributed.check_batch("train.batch_size", batch_size, mesh)
    distributed.check_batch("eval.batch_size", eval_batch_size or batch_size, mesh)
    main = distributed.is_main()
    write_json = rundir.write_json if main else (lambda path, obj: None)
    _check_config_matches(run_dir, config if main else None)
    distributed.sync("sparsejax-config")
    t_start = time.perf_counter()
    previous = rundir.read_json(run_dir / "summary.json") or {}
    if previous.get("status") in ("completed", "diverged") and previous.get("steps") == steps:
        return previous  # finished: nothing to train, nothing rewritten
    wall_base = max([rundir.number(r.get("wall_time_s")) or 0.0
                     for r in [previous, *rundir.read_metrics(run_dir)[-1:]]])

    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params_def = jax.tree_util.tree_structure(params_state)
    params = jax.device_get(nnx.to_pure_dict(params_state))  # host: same on every process
    del params_state
    fixed_flops, dense_flops = _flops_coefficients(model, seq_len)
    sparse = _is_sparse(tx, params)

    def init_state(params):
        opt_state = tx.init(params)
        if sparse:  # masks take effect before the first forward (straight-through: dense)
            keep_dense = find_state(opt_state).dense_weights
            pruned = prune(params, opt_state)
            params = jax.tree.map(lambda p, q: jnp.where(keep_dense, p, q), params, pruned)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
            rng=jax.random.PRNGKey(seed), n_avg=jnp.zeros((), jnp.float32),
            flops=jnp.zeros((), jnp.float32), loss_sum=jnp.zeros((), jnp.float32),
            loss_count=jnp.zeros((), jnp.int32),
        )

    state, state_sh = distributed.init_sharded(init_state, (params,), mesh, params)
    if sparse:
        _sparse_state(state.opt_state)  # refuses a composition that cannot keep the zeros
        counts = _sparsity_stats(state.opt_state, state.params)
    else:
        counts = accounting.structural_stats(model, params)
    del params
    restored = checkpoint.restore_newest(run_dir, state, keep=keep_checkpoints)
    if restored is not None:
        state = TrainState(*restored[0])
    distributed.sync("sparsejax-restored")  # all looked for checkpoints before any creates one
    mngr = checkpoint.manager(run_dir, keep=keep_checkpoints)
    start = int(state.step)

    train_step = make_train_step(
        graphdef, params_def, rest, tx, fixed_flops=fixed_flops, dense_flops=dense_flops,
        tokens_per_step=float(batch_size * seq_len), sparse=sparse, structural=counts,
        loss=loss, shardings=(state_sh, distributed.batch_sharding(mesh)),
    )
    evaluate = make_sequence_losses(graphdef, params_def, rest, mesh)
    count_violations = jax.jit(lambda p, s: sum(jax.tree_util.tree_leaves(check(p, s))))
    forward_weights = jax.jit(forward_params) if sparse else (lambda p, s: p)
    batch_sh = distributed.batch_sharding(mesh)
    if loss_aux is not None:  # replicated on the mesh, like the step expects it
        loss_aux = jax.tree.map(
            lambda a: distributed.put(np.asarray(a), distributed.replicated(mesh)), loss_aux)
    eval_bs = eval_batch_size or batch_size
    val = evaluation.eval_set(corpus.val, batch_size=eval_bs, seq_len=seq_len,
                              n_batches=eval_batches, seed=eval_seed)
    final_val = (val if (final_eval_batches or eval_batches) == eval_batches else
                 evaluation.eval_set(corpus.val, batch_size=eval_bs, seq_len=seq_len,
                                     n_batches=final_eval_batches, seed=eval_seed))

    log = rundir.MetricsLog(run_dir, resume_step=start) if main else rundir.NullLog()
    bar = rundir.Progress(steps, initial=start, enabled=progress and main)
    wb = _wandb_start(wandb, run_dir, config) if main else None
    summary_base = {"n_params": counts.n_params, "n_prunable": counts.n_prunable, "steps": steps,
                    "batch_size": batch_size, "seq_len": seq_len, "eval_seed": eval_seed,
                    "eval_sequences": final_val.xs.shape[0] * final_val.xs.shape[1],
                    "eval_sha256": final_val.sha256}
    write_json(run_dir / "summary.json", {**summary_base, "status": "running", "step": start})
    record: dict[str, Any] = {}
    val_loss = None
    diverged_at = None
    interrupt = _DeferredInterrupt()
    try:
        t_log, step_log = time.perf_counter(), start
        for step in range(start, steps):
            interrupt.check()  # Ctrl-C takes effect between steps, never inside a save
            x, y = data.get_batch(corpus.train, seed=seed, step=step, batch_size=batch_size,
                                  seq_len=seq_len)
            state, metrics = train_step(state, distributed.put(x, batch_sh),
                                        distributed.put(y, batch_sh), loss_aux)
            done = step + 1
            is_eval = done % eval_every == 0 or done == steps
            is_ckpt = done % checkpoint_every == 0 or done == steps
            if done % log_every and not is_eval:
                if is_ckpt:
                    checkpoint.save(mngr, done, state)
                continue
            train_loss = float(state.loss_sum) / max(int(state.loss_count), 1)  # syncs
            now = time.perf_counter()
            scored = (evaluation.evaluate(evaluate, forward_weights(state.params, state.opt_state),
                                          final_val if done == steps else val)
                      if is_eval else None)
            val_loss = scored.loss if scored is not None else None
            record = {
                "step": done,
                "tokens": done * batch_size * seq_len,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_loss_se": scored.se if scored is not None else None,
                "lr": float(lr_schedule(step)) if lr_schedule is not None else None,
                "density": float(metrics["density"]),
                "n_params": counts.n_params,
                "n_active": int(metrics["n_active"]),
                "n_avg": float(state.n_avg),
                "flops": float(state.flops),
                "step_time_s": (now - t_log) / (done - step_log),
                "wall_time_s": wall_base + now - t_start,
            }
            record["sparsity"] = 1.0 - record["density"]
            record["target_sparsity"] = float(metrics["target_sparsity"])
            n_bad = int(count_violations(state.params, state.opt_state)) if sparse else 0
            if n_bad:  # a weight that should be 0 is not: stop here
                raise ValueError(
                    f"step {done}: {n_bad} pruned weights are not 0 ("
                    f"{violations_report(check(state.params, state.opt_state))}); the "
                    "optimizer does not keep its masks exact (see README, 'Composition rules')"
                )
            state = state._replace(  # zeros placed as before: no recompile of the step
                loss_sum=distributed.put(np.zeros((), np.float32), state.loss_sum.sharding),
                loss_count=distributed.put(np.zeros((), np.int32), state.loss_count.sharding))
            log.write(record)
            if not all(math.isfinite(v) for v in (train_loss, val_loss) if v is not None):
                diverged_at = done  # stop at the first non-finite loss
                break
            if wb is not None:
                wb.log({k: v for k, v in record.items() if v is not None}, step=done)
            bar.update(done, loss=record["train_loss"], val=val_loss,
                       target=record["target_sparsity"], sparsity=record["sparsity"],
                       tok_s=round(batch_size * seq_len * (done - step_log) / (now - t_log)))
            if is_ckpt:
                checkpoint.save(mngr, done, state)
            t_log, step_log = time.perf_counter(), done
        mngr.wait_until_finished()
    except KeyboardInterrupt:
        try:
            mngr.wait_until_finished()  # a save in flight completes (or fails) first
        finally:
            write_json(run_dir / "summary.json", {
                **summary_base, **record, "status": "interrupted",
                "logged_step": record.get("step"), "step": mngr.latest_step() or 0,
                "resumed_from": start, "wall_time_s": wall_base + time.perf_counter() - t_start})
        raise
    except BaseException:
        write_json(run_dir / "summary.json", {
            **summary_base, **record, "status": "failed",
            "wall_time_s": wall_base + time.perf_counter() - t_start})
        raise
    finally:
        interrupt.restore()
        bar.close()
        log.close()
        mngr.close()
        if wb is not None:
            wb.finish()
    if not record:  # resumed a finished run: report the last logged values
        records = rundir.read_metrics(run_dir)
        if not records:
            raise ValueError(f"{run_dir} holds its final checkpoint but metrics.jsonl has no "
                             "record to summarize; restore metrics.jsonl or use a new workdir")
        record = records[-1]
    wall = wall_base + time.perf_counter() - t_start
    summary = {**summary_base, **record,
               "status": "completed" if diverged_at is None else "diverged",
               "final_val_loss": record.get("val_loss"), "wall_time_s": wall,
               "resumed_from": start}
    if diverged_at is not None:
        summary["diverged_step"] = diverged_at
    write_json(run_dir / "summary.json", summary)
    return summary


def _wandb_start(cfg: dict[str, Any] | None, run_dir: Path, config: dict[str, Any] | None):
    """Start wandb when enabled (default offline: no network unless mode='online')."""
    if not cfg or not cfg.get("enabled"):
        return None
    import wandb  # imported lazily: heavy, and unused unless enabled

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(project=cfg.get("project", "sparsejax"), mode=cfg.get("mode", "offline"),
                      name=cfg.get("name") or run_dir.name, group=cfg.get("group") or None,
                      dir=str(run_dir), id=run_id,
                      resume="allow", config=config)
