"""Sweeps: every run a recipe's ``sweep(add)`` lists, one run dir and one process each.

big_vision style: a recipe file defines ``get_config(arg)`` and ``sweep(add)``; ``add(**kw)``
records one run as dotted-key overrides (``add(**{"model.size": "XS", "train.steps": 600})``).
Each run trains in ``SWEEP_DIR/<name>`` in its own process (:mod:`sparsejax.sweep_worker`), so
a crash loses nothing else; ``parallel`` runs go at once, each pinned to its share of the
cores (:func:`core_slots`, :func:`worker_env`), the longest first.

Resuming (:func:`plan`): a run whose ``config.json`` matches its resolved config is skipped
when completed (or diverged: rerunning would diverge again) and resumed from its latest
checkpoint otherwise; a run whose ``config.json`` differs is an error naming the run and the
keys, before anything runs. ``SWEEP_DIR/sweep.json`` keeps one entry per run ever planned
there (overrides, status, final loss and its SE, wall time, the failure reason; the last
worker process's wall and CPU seconds, ``process_wall_s`` and ``cpu_s``), merged on
every launch and rewritten atomically after every change; the parent process is its only
writer (it holds ``SWEEP_DIR/lock``). The sweep dir is what ``sparsejax fit`` and
``scaling.logs`` read.

Backends (:class:`Executor`): ``"local"`` starts the worker processes itself
(:class:`LocalExecutor`); ``"ray"`` runs each as a Ray task on a cluster
(:mod:`sparsejax.sweep_ray`, the optional extra ``sparsejax[ray]``). Both share the planning,
resuming and ``sweep.json`` bookkeeping here; the local backend never imports ``ray``.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TextIO

import ml_collections

from sparsejax import configlib, runlog

SWEEP_FILE = "sweep.json"
WORKER_LOG = "worker.log"
FINISHED = ("completed", "diverged")  # rerunning gives the same result: skipped on relaunch
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
POLL_S = 0.5


def load_recipe(path: str) -> tuple[Any, str | None]:
    """Import a recipe file given as ``FILE.py[:arg]``; returns ``(module, arg)``."""
    file, _, arg = path.partition(":")
    if not Path(file).is_file():
        raise ValueError(f"config file {file!r} does not exist")
    spec = importlib.util.spec_from_file_location(Path(file).stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{file} defines no get_config(arg)")
    return module, (arg or None)


def expand(sweep_fn: Callable[[Callable[..., None]], None]) -> list[dict[str, Any]]:
    """The list of override dicts a ``sweep(add)`` function produces."""
    runs: list[dict[str, Any]] = []
    sweep_fn(lambda **kw: runs.append(dict(kw)))
    return runs


def run_name(overrides: dict[str, Any]) -> str:
    """A readable, filesystem-safe run name: ``size=XS,final=0.5`` -> ``size-XS_final-0.5``."""
    parts = [f"{k.split('.')[-1]}-{v}" for k, v in sorted(overrides.items())]
    return re.sub(r"[^A-Za-z0-9_.-]", "", "_".join(parts)) or "run"


def configs(recipe: str, extra: dict[str, Any] | None = None
            ) -> list[tuple[str, dict[str, Any], ml_collections.ConfigDict]]:
    """``(name, overrides, validated config)`` for every run of the recipe's sweep.

    ``extra`` (dotted key -> value, e.g. the command line's ``--config.KEY=VALUE``) applies to
    every run after the run's own overrides. Every config is checked
    (:func:`sparsejax.experiment.check`) before any run starts."""
    from sparsejax import experiment

    module, arg = load_recipe(recipe)
    if not hasattr(module, "sweep"):
        raise ValueError(f"{recipe}: the recipe defines no sweep(add)")
    out = []
    for overrides in expand(module.sweep):
        config = module.get_config(arg)
        for key, value in {**overrides, **(extra or {})}.items():
            configlib.set_key(config, key, value)
        experiment.check(config)
        out.append((run_name(overrides), overrides, config))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep of {recipe} lists duplicate runs: {names}")
    return out


class Run(NamedTuple):
    """One planned run of a sweep."""

    name: str
    overrides: dict[str, Any]  # the run's own overrides, then the command line's
    config: ml_collections.ConfigDict  # resolved (wandb.group set to the sweep's)
    action: str  # "run" (new), "resume" (from its latest checkpoint) or "skip" (finished)
    done_steps: int  # steps already trained (the latest checkpoint; steps when skipped)
    cost: float  # expected cost in step-equivalents (the progress bar's weight, _cost)


def _cost(config: ml_collections.ConfigDict) -> float:
    """A run's expected cost in step-equivalents, the progress bar's weight: ``steps · (1 +
    f / 3e5) + 150`` with ``f`` the model's forward FLOPs per token. At CPU scale a step costs
    a fixed overhead plus its FLOPs, and each run a start-up and a final evaluation worth about
    150 steps; fitted to one-core runs of the nano / tiny / mini models (about 300k FLOPs per
    token for tiny)."""
    from sparsejax import accounting, experiment

    m = experiment.model_config(config, vocab_size=256)
    f = accounting.flops_per_token(m.n_layer, m.d_model, m.d_ff, config.train.seq_len, 256)
    return config.train.steps * (1.0 + f / 3e5) + 150.0


def _config_change(old: dict[str, Any], new: dict[str, Any], keys: list[str]) -> str:
    def get(d: dict[str, Any], dotted: str) -> Any:
        for part in dotted.split("."):
            if not isinstance(d, dict) or part not in d:
                return "<absent>"
            d = d[part]
        return d

    return ", ".join(f"{k}: {get(old, k)!r} -> {get(new, k)!r}" for k in keys)


def plan(recipe: str, sweep_dir: str | Path, *, extra: dict[str, Any] | None = None,
         only: str | None = None) -> list[Run]:
    """The runs of ``recipe`` (those whose name matches a glob of ``only``, comma-separated)
    and what a launch
    does with each. Raises ``ValueError`` naming every run whose ``config.json`` differs from
    its resolved config (and the keys), and every run another process trains right now."""
    from sparsejax import checkpoint

    sweep_dir = Path(sweep_dir)
    runs = configs(recipe, extra)
    if only is not None:  # comma-separated globs (run names hold no commas)
        globs = [g for g in only.split(",") if g]
        picked = [r for r in runs if any(fnmatch.fnmatchcase(r[0], g) for g in globs)]
        if not picked:
            raise ValueError(f"--only {only!r} matches no run of {recipe} (runs: "
                             f"{', '.join(n for n, _, _ in runs)})")
        runs = picked
    out, changed, busy = [], [], []
    for name, overrides, config in runs:
        if not config.wandb.group:  # wandb runs of a sweep share a group
            config.wandb.group = sweep_dir.resolve().name
        run_dir = sweep_dir / name
        old = runlog.read_json(run_dir / "config.json")
        new = json.loads(json.dumps(config.to_dict()))
        if old is not None:
            keys = configlib.differing_keys(old, new)
            if keys:
                changed.append(f"{name} ({_config_change(old, new, keys)})")
                continue
        if runlog.lock_owner(run_dir) is not None:
            busy.append(f"{name} (process {runlog.lock_owner(run_dir)})")
        summary = runlog.read_json(run_dir / "summary.json") or {}
        steps = config.train.steps
        if summary.get("status") in FINISHED and summary.get("steps") == steps:
            action, done = "skip", steps
        else:
            done = checkpoint.latest_step(run_dir) or 0
            action = "resume" if done else "run"
        out.append(Run(name, {**overrides, **(extra or {})}, config, action, done,
                       _cost(config)))
    if changed:
        raise ValueError(
            f"sweep dir {sweep_dir}: the config of {len(changed)} run(s) differs from the one "
            f"they were trained with: {'; '.join(changed)}. Relaunch with the same recipe and "
            "overrides, use a new --workdir, or delete those run dirs")
    if busy:
        raise ValueError(f"sweep dir {sweep_dir}: run(s) in use by another process: "
                         f"{', '.join(busy)}; wait for them or stop them")
    return out


def core_slots(parallel: int, cores: list[int] | None = None) -> list[list[int]]:
    """Split the usable cores into ``parallel`` disjoint, equal slots (a process per slot);
    with more processes than cores, slots share cores round-robin, one core each."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"--parallel must be an int >= 1, got {parallel!r}")
    cores = sorted(os.sched_getaffinity(0)) if cores is None else sorted(cores)
    share = len(cores) // parallel
    if share == 0:
        return [[cores[i % len(cores)]] for i in range(parallel)]
    return [cores[i * share:(i + 1) * share] for i in range(parallel)]


def worker_env(n_threads: int | None, base: dict[str, str] | None = None, *,
               parallel: int = 1) -> dict[str, str]:
    """The environment of a worker process. With ``n_threads`` (a share of the cores), the
    thread pools that read the environment are bounded to it: OpenMP/MKL/OpenBLAS (numpy)
    and numba. XLA:CPU reads no such variable (``XLA_FLAGS``' ``intra_op_parallelism_threads``
    is not honoured by the PjRt CPU client): its thread pool is sized from the process's CPU
    affinity, which the worker sets to its slot (``os.sched_setaffinity``) before JAX starts,
    and the affinity also bounds every other thread of the process. ``XLA_FLAGS`` is left
    alone: it is part of the persistent compilation cache's key, so workers keep hitting the
    cache the parent's runs filled. On a GPU, ``parallel`` processes share its memory: each
    preallocates ``0.9 / parallel`` of it (``XLA_PYTHON_CLIENT_MEM_FRACTION``, unless set).
    The package's own folder goes first on ``PYTHONPATH`` so the worker imports the same
    ``sparsejax``."""
    env = dict(os.environ if base is None else base)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    if n_threads is not None:
        for key in THREAD_ENV:
            env[key] = str(n_threads)
    if parallel > 1 and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env:  # GPU: share its memory
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / parallel:.3f}"
    return env


class SweepFile:
    """``sweep.json``: one entry per run ever planned in the sweep dir, merged, never wiped."""

    def __init__(self, sweep_dir: Path, recipe: str):
        self.path = sweep_dir / SWEEP_FILE
        old = runlog.read_json(self.path) or {}
        self.entries: dict[str, dict[str, Any]] = {
            e["name"]: e for e in old.get("runs", []) if isinstance(e, dict) and "name" in e}
        self.recipe = recipe

    def update(self, name: str, **fields: Any) -> dict[str, Any]:
        entry = self.entries.setdefault(name, {"name": name})
        entry.update(fields)
        if fields.get("status") not in ("failed", "interrupted"):
            entry.pop("reason", None)
        runlog.write_json(self.path, {"recipe": self.recipe, "runs": list(self.entries.values())})
        return entry


def _summary_fields(run_dir: Path) -> dict[str, Any]:
    s = runlog.read_json(run_dir / "summary.json") or {}
    w = runlog.read_json(run_dir / "worker.json") or {}
    return {"status": s.get("status", "unknown"), "final_val_loss": s.get("final_val_loss"),
            "val_loss_se": s.get("val_loss_se"), "wall_time_s": s.get("wall_time_s"),
            "step": s.get("step"), "process_wall_s": w.get("wall_s"), "cpu_s": w.get("cpu_s")}


def _last_step(run_dir: Path) -> int:
    """The last logged step (the tail of ``metrics.jsonl``), 0 when none."""
    path = run_dir / "metrics.jsonl"
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def _failure_reason(log_path: Path, returncode: int) -> str:
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        lines = []
    for line in reversed(lines):
        if line.startswith("sparsejax: error: "):
            return line.removeprefix("sparsejax: error: ")
        if line.startswith("sparsejax: interrupted"):
            return "interrupted (SIGINT); the next launch resumes it"
    return f"exit status {returncode} (see {log_path})"


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """A sweep-level progress line on ``stream``: runs done, running, elapsed and an ETA from
    the work done so far this launch (runs weighted by their expected cost, :func:`_cost`;
    running ones count by their last logged step). On a terminal the line is redrawn in
    place; otherwise it is printed after every finished run."""

    def __init__(self, runs: list[Run], stream: TextIO, enabled: bool):
        self.total = sum(r.cost * (1 - r.done_steps / r.config.train.steps) for r in runs)
        self.n_runs = len(runs)
        self.stream, self.enabled = stream, enabled
        self.tty = enabled and stream.isatty()
        self.t0 = time.monotonic()
        self.finished = self.failed = 0
        self.done_cost = 0.0  # cost of the runs finished this launch

    def line(self, running: list[tuple[Run, Path]]) -> str:
        partial = sum(max(0, _last_step(d) - r.done_steps) / r.config.train.steps * r.cost
                      for r, d in running)
        done = self.done_cost + partial
        elapsed = time.monotonic() - self.t0
        frac = min(1.0, done / self.total) if self.total else 1.0
        eta = _fmt_time(elapsed * (self.total - done) / done) if done > 0 else "?"
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        failed = f" ({self.failed} not completed)" if self.failed else ""
        return (f"sweep [{bar}] {self.finished}/{self.n_runs} runs done{failed}, "
                f"{len(running)} running | {_fmt_time(elapsed)} elapsed, ETA {eta}")

    def draw(self, running: list[tuple[Run, Path]]) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.line(running))
            self.stream.flush()

    def event(self, text: str, running: list[tuple[Run, Path]]) -> None:
        """Print ``text`` (a finished run's line), then the progress line."""
        if self.tty:
            self.stream.write("\r\033[K" + text + "\n" + self.line(running))
        else:
            self.stream.write(text + "\n" + (self.line(running) + "\n" if self.enabled else ""))
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _start(run: Run, run_dir: Path, cores: list[int] | None, n_threads: int | None,
           parallel: int) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "sparsejax.sweep_worker", str(run_dir),
            "--parent", str(os.getpid())]
    if cores is not None:
        argv += ["--cores", ",".join(map(str, cores))]
    with (run_dir / WORKER_LOG).open("a") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {run.action} {run.name}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                env=worker_env(n_threads, parallel=parallel), text=True)
    proc.stdin.write(json.dumps(run.config.to_dict()))
    proc.stdin.close()
    return proc


class Handle(Protocol):
    """A started run, as :func:`_execute` watches it (``subprocess.Popen`` is one)."""

    returncode: int | None  # the worker's exit status once :meth:`poll` saw it end

    def poll(self) -> int | None: ...
    def send_signal(self, sig: int) -> None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def kill(self) -> None: ...


class Executor(Protocol):
    """Where a sweep's runs go: ``slots`` runs at once; :meth:`start` launches one run's
    worker (``python -m sparsejax.sweep_worker RUN_DIR``, config on stdin) in ``slot``."""

    slots: int

    def check(self, runs: list[Run]) -> None: ...
    def start(self, run: Run, run_dir: Path, slot: int) -> Handle: ...
    def close(self) -> None: ...


class LocalExecutor:
    """Worker processes on this machine, ``parallel`` at once, each pinned to its share of
    the cores (:func:`core_slots`) when there are several."""

    def __init__(self, parallel: int = 1):
        self.cores = core_slots(parallel)
        self.slots = parallel

    def check(self, runs: list[Run]) -> None:
        del runs  # any run fits: it gets its share of this machine

    def start(self, run: Run, run_dir: Path, slot: int) -> subprocess.Popen:
        pin = self.slots > 1  # one process: it gets every core, nothing to split
        cores = self.cores[slot] if pin else None
        return _start(run, run_dir, cores, len(cores) if pin else None, self.slots)

    def close(self) -> None:
        pass


BACKENDS = ("local", "ray")


def check_backend(backend: str, parallel: int | None, address: str | None) -> None:
    """``ValueError`` naming the flag for a backend/flag combination that cannot work."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "local":
        if address is not None:
            raise ValueError("--address is for --backend ray (the Ray cluster to use)")
        core_slots(1 if parallel is None else parallel)  # checks --parallel
    elif parallel is not None:
        raise ValueError("--parallel is for --backend local; Ray runs as many runs at once as "
                         "the cluster's resources allow (resources.cpus / resources.gpus of "
                         "each run's config)")


def make_executor(backend: str = "local", *, parallel: int | None = None,
                  address: str | None = None) -> Executor:
    """``"local"`` (``parallel`` processes, default 1) or ``"ray"`` (every run submitted as a
    Ray task with the resources of its config; on the cluster at ``address``, or on a local
    one started for the sweep); ``ValueError`` for anything else."""
    check_backend(backend, parallel, address)
    if backend == "local":
        return LocalExecutor(1 if parallel is None else parallel)
    from sparsejax import sweep_ray  # imports ray: the optional extra

    return sweep_ray.RayExecutor(address=address)


def _finish_line(name: str, fields: dict[str, Any], reason: str | None, wall: float) -> str:
    status = fields["status"]
    if status == "completed":
        loss, se = fields.get("final_val_loss"), fields.get("val_loss_se")
        loss_s = "n/a" if loss is None else f"{runlog.number(loss):.4f}"
        se_s = "" if se is None else f"±{runlog.number(se):.4f}"
        return f"done {name} loss={loss_s}{se_s} in {wall:.1f}s"
    if status == "diverged":
        return f"diverged {name} at step {fields.get('step')} in {wall:.1f}s"
    return f"{status} {name} in {wall:.1f}s: {reason}"


def launch(recipe: str, sweep_dir: str | Path, *, extra: dict[str, Any] | None = None,
           only: str | None = None, parallel: int | None = None, dry_run: bool = False,
           progress: bool = True, stream: TextIO | None = None, backend: str = "local",
           address: str | None = None, executor: Executor | None = None
           ) -> list[dict[str, Any]]:
    """Run (or with ``dry_run`` only list) the sweep's runs; returns one entry per planned run
    (``name``, ``action``, ``overrides`` and, unless ``dry_run``, its ``sweep.json`` fields:
    ``status``, ``final_val_loss``, ``val_loss_se``, ``wall_time_s``, ``reason``).

    Finished-run lines and the progress line go to ``stream`` (default stderr). A run that
    fails is marked ``failed`` with the reason (the last ``sparsejax: error:`` line of its
    ``worker.log``) and the others go on. ``KeyboardInterrupt`` forwards SIGINT to the running
    workers (they stop at the next step boundary and keep their checkpoints), marks them
    ``interrupted`` and propagates.

    ``backend``/``parallel``/``address``: see :func:`make_executor`; ``executor`` replaces
    them (tests pass their own)."""
    if executor is None:  # checked before anything is planned; started under the lock
        check_backend(backend, parallel, address)
    sweep_dir = Path(sweep_dir)
    runs = plan(recipe, sweep_dir, extra=extra, only=only)
    if dry_run:
        return [{"name": r.name, "action": r.action, "overrides": r.overrides,
                 "done_steps": r.done_steps, "steps": r.config.train.steps} for r in runs]
    stream = sys.stderr if stream is None else stream
    sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = runlog.RunLock(sweep_dir).__enter__()
    except runlog.RunDirBusyError:
        raise runlog.RunDirBusyError(
            f"sweep dir {sweep_dir} is in use by another sweep (process "
            f"{runlog.lock_owner(sweep_dir)}); wait for it to end or stop it") from None
    try:
        if executor is None:
            executor = make_executor(backend, parallel=parallel, address=address)
        try:
            return _execute(runs, sweep_dir, SweepFile(sweep_dir, recipe), executor,
                            Progress(runs, stream, progress))
        finally:
            executor.close()
    finally:
        lock.__exit__()


def _execute(runs: list[Run], sweep_dir: Path, book: SweepFile, executor: Executor,
             bar: Progress) -> list[dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for r in runs:
        fields = _summary_fields(sweep_dir / r.name) if r.action == "skip" else {
            "status": "pending"}
        entries[r.name] = book.update(r.name, overrides=r.overrides, action=r.action, **fields)
    # longest first (by remaining expected cost): the shortest makespan on parallel slots
    pending = sorted((r for r in runs if r.action != "skip"),
                     key=lambda r: -r.cost * (1 - r.done_steps / r.config.train.steps))
    bar.n_runs = len(pending)
    executor.check(pending)
    free = list(range(min(executor.slots, len(pending))))
    running: dict[int, tuple[Run, Handle, float]] = {}

    def fill() -> None:
        while pending and free:
            slot = free.pop(0)
            r = pending.pop(0)
            proc = executor.start(r, sweep_dir / r.name, slot)
            running[slot] = (r, proc, time.monotonic())
            book.update(r.name, status="running")

    def in_flight() -> list[tuple[Run, Path]]:
        return [(x, sweep_dir / x.name) for x, _, _ in running.values()]

    try:
        while pending or running:
            fill()
            time.sleep(POLL_S)
            lines = []
            for slot, (r, proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[slot]
                free.append(slot)
                wall = time.monotonic() - t0
                fields = _summary_fields(sweep_dir / r.name)
                reason = None
                if proc.returncode != 0 or fields["status"] not in FINISHED:
                    if fields["status"] not in ("diverged", "interrupted"):
                        fields["status"] = "failed"  # whatever the run dir says
                    if fields["status"] != "diverged":
                        reason = _failure_reason(sweep_dir / r.name / WORKER_LOG,
                                                 proc.returncode)
                entries[r.name] = book.update(r.name, reason=reason, **fields)
                bar.finished += 1
                bar.failed += fields["status"] != "completed"
                bar.done_cost += r.cost * (1 - r.done_steps / r.config.train.steps)
                lines.append(_finish_line(r.name, fields, reason, wall))
            if lines:
                fill()  # the next runs start before the progress line counts them
            for line in lines:
                bar.event(line, in_flight())
            bar.draw(in_flight())
    except KeyboardInterrupt:
        for _r, proc, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for r, proc, _ in running.values():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            fields = _summary_fields(sweep_dir / r.name)
            if fields["status"] not in FINISHED:  # it may have finished before the signal
                fields["status"] = "interrupted"
            entries[r.name] = book.update(r.name, **fields)
        raise
    finally:
        bar.close()
    return [{**entries[r.name]} for r in runs]
