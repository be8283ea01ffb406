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
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparsejax import checks
from sparsejax.errors import ConfigError, ExactnessError, InputError, SaveFailed
from sparsejax.run import (
    accounting,
    checkpoint,
    configlib,
    data,
    distributed,
    evaluation,
    hardware,
    rundir,
)
from sparsejax.run.build import Experiment
from sparsejax.run.outputs import Clock, Outputs
from sparsejax.run.rundir import RunDir
from sparsejax.run.saving import save_checked, wait_for_saves
from sparsejax.run.signals import DeferredInterrupt
from sparsejax.run.spec import RunSpec
from sparsejax.run.step import (
    TrainState,
    flops_coefficients,
    is_sparse,
    make_train_step,
    sparse_state,
)
from sparsejax.state import (
    SparsityStats,
    check,
    find_state,
    forward_params,
    prune,
    violations_report,
)
from sparsejax.state import sparsity_stats as _sparsity_stats


def _check_config_matches(run: RunDir, config: dict[str, Any]) -> None:
    """Write ``config`` into a new run dir, or check that it is the one the run dir holds
    (logging and placement keys, ``wandb.*`` and ``mesh.*``, may change on resume)."""
    old = run.read_config()
    if old is not None:
        configlib.stored_spec(old, str(run.config_file))  # a run's config, or named refused
        diff = configlib.differing_keys(old, json.loads(json.dumps(config)))
        if diff:
            raise ConfigError(
                f"workdir {run} holds a run with a different config (keys {diff}); use a new "
                "--workdir or the same config to resume")
    elif run.checkpoint_steps():
        raise InputError(
            f"workdir {run} holds checkpoints but no {RunDir.CONFIG}, so it cannot tell whether "
            f"they belong to this config; restore {run.config_file} or use a new --workdir")
    else:
        run.write_config(config)




def run(spec: RunSpec, exp: Experiment, workdir: str | Path, *,
        mesh: jax.sharding.Mesh | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``exp`` (model, optimizer, corpus, ...) as ``spec`` says, in ``workdir``;
    returns the summary.

    The run dir ``workdir`` receives ``config.json`` (``spec``), ``metrics.jsonl``,
    ``summary.json`` and ``checkpoints/``. If it already holds checkpoints, training resumes
    from the latest one (the config must match). Sparsity, its target and the parameter
    counts are read from the optimizer state (:func:`sparsejax.sparsity_stats`), or from the
    model's layers when they are sparse by construction (BSR kernels); right after ``tx.init``
    the params are pruned with :func:`sparsejax.prune`, so step 0 already runs sparse. At
    every log step :func:`sparsejax.check` must find every pruned weight at 0, else the run
    fails (:class:`~sparsejax.errors.ExactnessError`) naming the leaves. ``exp.loss(model,
    x_BxL, y_BxL, exp.loss_aux)``, when given, is the training objective instead of the
    cross-entropy (``train_loss`` logs it; ``val_loss`` stays the cross-entropy).

    ``mesh``: the ``(data, fsdp)`` device mesh (:func:`sparsejax.run.distributed.make_mesh`;
    default: every device on ``data``). Params, masks and optimizer state are sharded over
    ``fsdp``, batches over both axes; with several processes (``jax.distributed``) only
    process 0 writes the run dir's files and holds its lock.

    Evaluation (:mod:`sparsejax.run.evaluation`): every ``eval.every`` steps on
    ``eval.batches`` validation batches, and at the last step on ``eval.final_batches``, both
    drawn with ``eval.seed``, never ``seed``, so every run of a sweep is scored on the same
    tokens. The final score is the summary's ``val_loss`` (and ``final_val_loss``) with its
    standard error ``val_loss_se``, the number of sequences ``eval_sequences`` and the tokens'
    fingerprint ``eval_sha256``.

    A process holds ``RUN_DIR/lock`` while it trains (a second one raises
    :class:`~sparsejax.errors.RunDirBusyError`). A finished run (``completed`` or
    ``diverged``) is returned as found. The run stops at the first log step whose loss is not
    finite, with status ``diverged``. SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption)
    saves a checkpoint at the next step boundary, leaves status ``interrupted`` at that step,
    releases the lock and raises :class:`~sparsejax.errors.Interrupted` (a
    ``KeyboardInterrupt``); a second signal stops at once, without a new checkpoint
    (:mod:`sparsejax.run.signals`). A
    checkpoint that cannot be saved ends the run with status ``failed`` and the reason
    (:class:`~sparsejax.errors.SaveFailed`); any exception leaves ``failed`` with its type and
    message in the summary's ``error``. ``wall_time_s`` adds up over resumptions.
    """
    run = RunDir(workdir).create()
    run.check_files()  # a file it cannot read: refused before anything is written
    with DeferredInterrupt() as interrupt:  # a signal while setting up stops at once
        if not distributed.is_main():  # process 0 holds the lock for the whole job
            return _run(spec, exp, run, mesh, progress, interrupt)
        with run.lock():
            return _run(spec, exp, run, mesh, progress, interrupt)


def _run(spec: RunSpec, exp: Experiment, run: RunDir, mesh: jax.sharding.Mesh | None,
         progress: bool, interrupt: DeferredInterrupt) -> dict[str, Any]:
    """:func:`run` holding the lock: check, set up, loop, summarize."""
    t_start = time.perf_counter()
    mesh = _check(spec, exp, mesh)
    main = distributed.is_main()
    if main:
        _check_config_matches(run, spec.to_dict())
    distributed.sync("sparsejax-config")
    previous = run.read_summary() or {}
    if previous.get("status") in ("completed", "diverged") and previous.get(
            "steps") == spec.train.steps:
        return previous  # finished: nothing to train, nothing rewritten
    wall_base = max([rundir.number(r.get("wall_time_s")) or 0.0
                     for r in [previous, *run.read_metrics()[-1:]]])
    setup = _setup(spec, exp, run, mesh)
    clock = Clock(t_start, wall_base)
    out = Outputs.open(spec, run, start=setup.start, counts=setup.counts,
                       final_eval=setup.final_val, main=main, progress=progress)
    record: dict[str, Any] = {}
    interrupt.defer()  # from here a signal stops the loop at a step boundary, after a save
    ended = False
    try:
        record, diverged_at = _loop(spec, exp, setup, out, clock, interrupt)
        wait_for_saves(setup.mngr)
        ended = True
    except KeyboardInterrupt as stop:  # a signal: interrupted at the latest committed step
        try:
            wait_for_saves(setup.mngr)  # the save in flight (the step boundary's) completes
        except SaveFailed as err:
            out.failed(err, clock.wall())
            raise err from stop
        except KeyboardInterrupt:  # a second signal while it completes: stop waiting
            pass
        out.interrupted(run.latest_checkpoint_step() or 0, setup.start, clock.wall())
        raise
    except BaseException as err:
        out.failed(err, clock.wall())
        raise
    finally:
        out.close()
        try:
            setup.mngr.close()
        except Exception:
            if ended:  # else the error in flight says what went wrong
                raise
    return _finish(run, out, record, diverged_at, setup.start, clock)


def _check(spec: RunSpec, exp: Experiment, mesh: jax.sharding.Mesh | None
           ) -> jax.sharding.Mesh:
    """The mesh to train on, after checking that the spec's sizes fit the model and mesh."""
    t, ev = spec.train, spec.eval
    checks.positive_ints(steps=t.steps, batch_size=t.batch_size, seq_len=t.seq_len,
                         eval_every=ev.every, eval_batches=ev.batches, log_every=t.log_every,
                         checkpoint_every=spec.checkpoint.every,
                         final_eval_batches=ev.final_batches)
    checks.integer("eval_seed", ev.seed, minimum=0)
    if t.seq_len > exp.model.cfg.n_ctx:
        raise ConfigError(f"config.train.seq_len ({t.seq_len}) must be <= the model's n_ctx "
                          f"({exp.model.cfg.n_ctx})")
    mesh = distributed.make_mesh() if mesh is None else mesh
    distributed.check_batch("train.batch_size", t.batch_size, mesh)
    distributed.check_batch("eval.batch_size", ev.batch_size, mesh)
    return mesh


class _Setup(NamedTuple):
    """What the loop needs, built once: the state (restored when the run dir has a
    checkpoint), the compiled functions, the evaluation sets and the checkpoint manager."""

    state: TrainState
    start: int  # the step training starts from (the restored checkpoint's; 0 when fresh)
    sparse: bool  # the optimizer holds masks
    counts: SparsityStats  # parameter counts (n_params, n_prunable)
    train_step: Any  # jitted (state, x, y, loss_aux) -> (state, metrics), state donated
    evaluate: Any  # (params, x_BxL, y_BxL) -> per-sequence losses
    forward_weights: Any  # (params, opt_state) -> the weights the forward pass uses
    count_violations: Any  # (params, opt_state) -> pruned weights that are not 0
    val: evaluation.EvalSet  # the periodic evaluation set
    final_val: evaluation.EvalSet  # the final one (the periodic one when the sizes match)
    batch_sh: Any  # the batches' sharding
    loss_aux: Any  # exp.loss_aux, replicated on the mesh
    mngr: Any  # orbax CheckpointManager


def _setup(spec: RunSpec, exp: Experiment, run: RunDir, mesh: jax.sharding.Mesh) -> _Setup:
    """Split the model, initialise (or restore) the sharded state, compile the steps."""
    graphdef, params_state, rest = nnx.split(exp.model, nnx.Param, ...)
    params_def = jax.tree_util.tree_structure(params_state)
    params = jax.device_get(nnx.to_pure_dict(params_state))  # host: same on every process
    del params_state
    sparse = is_sparse(exp.tx, params)
    state, state_sh = distributed.init_sharded(
        functools.partial(_init_state, exp.tx, sparse, spec.seed), (params,), mesh, params)
    if sparse:
        sparse_state(state.opt_state)  # refuses a composition that cannot keep the zeros
        counts = _sparsity_stats(state.opt_state, state.params)
    else:
        counts = accounting.structural_stats(exp.model, params)
    del params
    keep = spec.checkpoint.keep
    restored = checkpoint.restore_newest(run, state, keep=keep)
    if restored is not None:
        state = TrainState(*restored[0])
    distributed.sync("sparsejax-restored")  # all looked for checkpoints before any creates one
    fixed_flops, dense_flops = flops_coefficients(exp.model, spec.train.seq_len)
    batch_sh = distributed.batch_sharding(mesh)
    train_step = make_train_step(
        graphdef, params_def, rest, exp.tx, fixed_flops=fixed_flops, dense_flops=dense_flops,
        tokens_per_step=float(spec.train.batch_size * spec.train.seq_len), sparse=sparse,
        structural=counts, loss=exp.loss, shardings=(state_sh, batch_sh))
    loss_aux = exp.loss_aux
    if loss_aux is not None:  # replicated on the mesh, like the step expects it
        loss_aux = jax.tree.map(
            lambda a: distributed.put(np.asarray(a), distributed.replicated(mesh)), loss_aux)
    val, final_val = _eval_sets(spec, exp.corpus)
    return _Setup(
        state=state, start=int(state.step), sparse=sparse, counts=counts,
        train_step=train_step,
        evaluate=evaluation.sequence_losses(exp.model, mesh=mesh),
        forward_weights=jax.jit(forward_params) if sparse else (lambda p, s: p),
        count_violations=jax.jit(lambda p, s: sum(jax.tree_util.tree_leaves(check(p, s)))),
        val=val, final_val=final_val, batch_sh=batch_sh, loss_aux=loss_aux,
        mngr=checkpoint.manager(run, keep=keep))


def _init_state(tx: optax.GradientTransformation, sparse: bool, seed: int, params: Any
                ) -> TrainState:
    """Step 0's state; sparse runs start pruned (straight-through methods: dense)."""
    opt_state = tx.init(params)
    if sparse:  # masks take effect before the first forward
        keep_dense = find_state(opt_state).dense_weights
        pruned = prune(params, opt_state)
        params = jax.tree.map(lambda p, q: jnp.where(keep_dense, p, q), params, pruned)
    zero = jnp.zeros((), jnp.float32)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      rng=jax.random.PRNGKey(seed), n_avg=zero, flops=zero, loss_sum=zero,
                      loss_count=jnp.zeros((), jnp.int32))


def _eval_sets(spec: RunSpec, corpus: data.Corpus
               ) -> tuple[evaluation.EvalSet, evaluation.EvalSet]:
    """The periodic and the final evaluation sets (one set when their sizes match)."""
    ev = spec.eval

    def draw(n_batches: int) -> evaluation.EvalSet:
        return evaluation.eval_set(corpus.val, batch_size=ev.batch_size,
                                   seq_len=spec.train.seq_len, n_batches=n_batches,
                                   seed=ev.seed)

    val = draw(ev.batches)
    return val, (val if ev.final_batches == ev.batches else draw(ev.final_batches))






def _loop(spec: RunSpec, exp: Experiment, setup: _Setup, out: Outputs, clock: Clock,
          interrupt: DeferredInterrupt) -> tuple[dict[str, Any], int | None]:
    """Train from ``setup.start`` to ``train.steps``; returns the last logged record and the
    step the loss stopped being finite at (``None``: it stayed finite)."""
    t, state = spec.train, setup.state
    tokens_per_step = t.batch_size * t.seq_len
    t_log, step_log, flops_log = time.perf_counter(), setup.start, float(state.flops)
    devices = list(setup.batch_sh.mesh.devices.flat)
    record: dict[str, Any] = {}
    saved = setup.start  # the latest step checkpointed (or restored)
    for step in range(setup.start, t.steps):
        if interrupt.pending:  # a signal: checkpoint the step just completed, then stop
            if step > saved:
                save_checked(setup.mngr, step, state)
            interrupt.check()
        x, y = data.get_batch(exp.corpus.train, seed=spec.seed, step=step,
                              batch_size=t.batch_size, seq_len=t.seq_len)
        state, metrics = setup.train_step(state, distributed.put(x, setup.batch_sh),
                                          distributed.put(y, setup.batch_sh), setup.loss_aux)
        done = step + 1
        is_eval = done % spec.eval.every == 0 or done == t.steps
        is_ckpt = done % spec.checkpoint.every == 0 or done == t.steps
        if done % t.log_every == 0 or is_eval:
            jax.block_until_ready(state.loss_sum)  # the interval's steps are done
            now = time.perf_counter()
            record = _log_step(spec, exp, setup, state, metrics, done, is_eval,
                               step_time=(now - t_log) / (done - step_log), wall=clock.wall())
            record["mfu"] = hardware.mfu(record["flops"] - flops_log, now - t_log, devices)
            diverged = _diverged(record)
            if not diverged:  # a diverged run's NaNs reach pruned weights: no composition error
                _check_exact(setup, state, done)
            state = _reset_loss_window(state)
            out.record(record)
            if diverged:
                return record, done  # stop at the first non-finite loss
            out.report(record, tokens_per_step * (done - step_log) / (now - t_log))
        if is_ckpt:
            save_checked(setup.mngr, done, state)
            saved = done
        if record.get("step") == done:  # the next interval's step time starts after the save
            t_log, step_log, flops_log = time.perf_counter(), done, record["flops"]
    return record, None


def _log_step(spec: RunSpec, exp: Experiment, setup: _Setup, state: TrainState,
              metrics: dict[str, Any], done: int, is_eval: bool, *, step_time: float,
              wall: float) -> dict[str, Any]:
    """The ``metrics.jsonl`` record of step ``done`` (scoring the model on an eval step)."""
    t = spec.train
    train_loss = float(state.loss_sum) / max(int(state.loss_count), 1)  # syncs
    scored = None
    if is_eval:
        eval_set = setup.final_val if done == t.steps else setup.val
        scored = evaluation.evaluate(setup.evaluate,
                                     setup.forward_weights(state.params, state.opt_state),
                                     eval_set)
    density = float(metrics["density"])
    return {
        "step": done,
        "tokens": done * t.batch_size * t.seq_len,
        "train_loss": train_loss,
        "val_loss": scored.loss if scored is not None else None,
        "val_loss_se": scored.se if scored is not None else None,
        "lr": float(exp.lr_schedule(done - 1)) if exp.lr_schedule is not None else None,
        "density": density,
        "n_params": setup.counts.n_params,
        "n_active": int(metrics["n_active"]),
        "n_avg": float(state.n_avg),
        "flops": float(state.flops),
        "step_time_s": step_time,
        "wall_time_s": wall,
        "sparsity": 1.0 - density,
        "target_sparsity": float(metrics["target_sparsity"]),
    }


def _diverged(record: dict[str, Any]) -> bool:
    """Whether the logged train or validation loss is not finite."""
    return not all(math.isfinite(v) for v in (record["train_loss"], record["val_loss"])
                   if v is not None)


def _check_exact(setup: _Setup, state: TrainState, done: int) -> None:
    """Raise :class:`~sparsejax.errors.ExactnessError` when a pruned weight is not 0 (called
    once the loss is known to be finite: a diverged run's NaNs reach pruned weights when a
    pruning step moves its masks, which is no composition error)."""
    if not setup.sparse:
        return
    n_bad = int(setup.count_violations(state.params, state.opt_state))
    if n_bad:
        raise ExactnessError(
            f"step {done}: {n_bad} pruned weights are not 0 ("
            f"{violations_report(check(state.params, state.opt_state))}); the optimizer does "
            "not keep its masks exact (see README, 'Composition rules')")


def _reset_loss_window(state: TrainState) -> TrainState:
    """Zero the train-loss window, placed as before (no recompile of the step)."""
    return state._replace(
        loss_sum=distributed.put(np.zeros((), np.float32), state.loss_sum.sharding),
        loss_count=distributed.put(np.zeros((), np.int32), state.loss_count.sharding))


def _finish(run: RunDir, out: Outputs, record: dict[str, Any], diverged_at: int | None,
            start: int, clock: Clock) -> dict[str, Any]:
    """Write and return the final summary (a resumed finished run reports its last record)."""
    if not record:
        records = run.read_metrics()
        if not records:
            raise InputError(f"{run} holds its final checkpoint but {run.metrics_file} has no "
                             "record to summarize; restore it or use a new workdir")
        record = records[-1]
    summary = {**out.summary_base, **record,
               "status": "completed" if diverged_at is None else "diverged",
               "final_val_loss": record.get("val_loss"), "wall_time_s": clock.wall(),
               "resumed_from": start}
    if diverged_at is not None:
        summary["diverged_step"] = diverged_at
    out.write_summary(summary)
    return {**out.summary_base, **summary}


