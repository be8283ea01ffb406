"""The run directory: the one owner of its file names, and of reading and writing each file.

docs/design.md, "Run directory". Every other module asks :class:`RunDir` (a run dir) or
:class:`SweepDir` (a folder of run dirs: a sweep or a soup) for a path, or reads and writes
through them; none spells a file name. A run dir holds:

* ``config.json``: the resolved config (:meth:`RunDir.read_config`, :meth:`RunDir.write_config`);
* ``metrics.jsonl``: one JSON object per logged step (:class:`MetricsLog`, :func:`read_metrics`),
  append-only: on resume, records past the restored checkpoint are superseded by a resume
  marker, never deleted, so what :func:`read_metrics` returns for a resumed run equals an
  uninterrupted one's (:mod:`sparsejax.run.files`);
* ``summary.json``: status, step and final scores (:meth:`RunDir.read_summary`);
* ``lock``: the PID of the process training in it (:class:`RunLock`, :func:`lock_owner`);
* ``checkpoints/`` (orbax step folders, :mod:`sparsejax.run.checkpoint`) and
  ``damaged_checkpoints/`` (those that did not restore, moved aside);
* ``wandb_id``: the wandb run id, so a resumed run continues the same wandb run;
* ``worker.json`` and ``worker.log``: a sweep worker's record (:class:`WorkerRecord`: exit
  status, wall and CPU seconds, the error that failed the run) and its output;
* ``oneshot.json`` and ``oneshot.png`` (``sparsejax oneshot``) and ``export/``
  (``sparsejax export``'s default output folder).

A sweep dir holds one run dir per run, ``sweep.json`` and its own ``lock``; a soup dir holds
``soup.json`` beside its run dirs.

Writes go through :mod:`sparsejax.run.files`: JSON files atomically via a unique temp file,
the lock and the metrics log opened without following symbolic links. Non-finite floats are
written as the JSON strings ``"nan"``, ``"inf"`` and ``"-inf"`` (JSON has
no such numbers); ``float(value)`` reads them back, and :func:`number` does so for any field.
A run whose loss became non-finite has ``"status": "diverged"`` and ``"diverged_step"`` in its
``summary.json``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Self, TextIO

from tqdm import tqdm

from sparsejax import errors
from sparsejax.errors import RunDirBusyError
from sparsejax.run import files
from sparsejax.run.files import JsonLog as MetricsLog

__all__ = [
    "METRIC_FIELDS", "STATUSES", "TIMING_FIELDS", "MetricsLog", "NullLog", "Progress", "RunDir",
    "PathLike", "RunDirBusyError", "RunLock", "RunStatus", "SweepDir", "WorkerRecord",
    "duration", "lock_owner", "number", "read_json", "read_metrics", "run_status", "write_json",
]

METRIC_FIELDS = (
    "step", "tokens", "train_loss", "val_loss", "val_loss_se", "lr", "sparsity",
    "target_sparsity", "density",
    "n_params", "n_active", "n_avg", "flops", "step_time_s", "wall_time_s", "mfu",
)
TIMING_FIELDS = ("step_time_s", "tokens_per_s", "wall_time_s", "mfu")
STATUSES = ("running", "completed", "failed", "diverged", "interrupted")
PathLike = str | os.PathLike  # a path, or a RunDir / SweepDir


def number(value: Any) -> float | None:
    """A logged numeric field as a float (``"nan"``/``"inf"`` strings included); ``None`` stays
    ``None``."""
    return None if value is None else float(value)


def write_json(path: PathLike, obj: dict[str, Any]) -> None:
    """Write atomically (a unique temp file, then rename: :func:`sparsejax.run.files.
    write_atomic`) so a kill never leaves half a file and no planted link is followed."""
    files.write_atomic(Path(path), json.dumps(files.clean(obj), indent=2, sort_keys=True,
                                              allow_nan=False))


def read_json(path: PathLike, fix: str = "restore or delete it") -> dict[str, Any] | None:
    """The object in ``path``, or ``None`` when the file does not exist; :class:`InputError
    <sparsejax.errors.InputError>` naming the file and ``fix`` when it is not a JSON object
    (or is a folder, or cannot be read)."""
    path = Path(path)
    data = files.read_bytes(path)
    if data is None:
        return None
    try:
        obj = json.loads(data.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise errors.InputError(f"{path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(obj, dict):
        raise errors.InputError(f"{path} holds a JSON {type(obj).__name__}, not an object; "
                                f"{fix}")
    return obj


def _is_number(value: Any) -> bool:
    """A logged number: an int or float, or a string ``float`` reads (``"nan"``, ``"inf"``)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def _check_fields(obj: dict[str, Any], path: Path, fix: str, *,
                  ints: tuple[str, ...] = (), numbers: tuple[str, ...] = (),
                  strings: tuple[str, ...] = (), choices: dict[str, tuple[str, ...]] | None = None
                  ) -> dict[str, Any]:
    """``obj`` when each of these keys it holds has its type (``None`` allowed); else an
    :class:`~sparsejax.errors.InputError` naming the file, the key, what it holds and ``fix``."""
    for key, value in obj.items():
        if value is None:
            continue
        if key in (choices or {}):
            want, ok = f"one of {choices[key]}", value in choices[key]
        elif key in ints:
            want, ok = "an int", isinstance(value, int) and not isinstance(value, bool)
        elif key in numbers:
            want, ok = "a number", _is_number(value)
        elif key in strings:
            want, ok = "a string", isinstance(value, str)
        else:
            continue
        if not ok:
            raise errors.InputError(f"{path}: {key!r} must be {want}, got {value!r}; {fix}")
    return obj


SUMMARY_INTS = ("step", "steps", "logged_step", "diverged_step", "resumed_from")
SUMMARY_NUMBERS = ("final_val_loss", *(k for k in METRIC_FIELDS if k != "step"))


class RunStatus(NamedTuple):
    """What a run dir's files say about the run (:meth:`RunDir.status`)."""

    status: str  # one of STATUSES, "unknown" (no summary.json), or a sweep's "pending"
    step: int | None  # the latest logged step (the step of ``loss``)
    loss: float | None  # that step's val_loss, else its train_loss
    wall_time_s: float | None
    checkpoint: int | None = None  # the latest committed checkpoint: where a resume starts
    steps: int | None = None  # the run's train.steps
    error: str | None = None  # why a failed run failed (its summary's ``error``)

    def eta_s(self) -> float | None:
        """Seconds a ``running`` run still needs at its pace so far (``None`` otherwise)."""
        if self.status != "running" or not self.step or not self.steps or not self.wall_time_s:
            return None
        return self.wall_time_s / self.step * max(0, self.steps - self.step)


class WorkerRecord(NamedTuple):
    """``worker.json``: what a sweep worker process recorded when it ended."""

    exit: int  # its exit status: 0 completed, 130 interrupted, else failed (errors.*.exit_code)
    wall_s: float | None = None  # the process's wall seconds
    cpu_s: float | None = None  # its user + system CPU seconds
    cores: list[int] | None = None  # the CPUs it ran on
    pid: int | None = None
    error_type: str | None = None  # the class name of the exception that failed the run
    error: str | None = None  # its message, on one line

    def reason(self) -> str | None:
        """``"ErrorType: message"`` (or the message alone), ``None`` when nothing failed."""
        if self.error is None:
            return None
        return self.error if self.error_type is None else f"{self.error_type}: {self.error}"


class _In:
    """A file or folder of a run (or sweep) dir: on an instance, ``instance.path / name``."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, instance: RunDir | SweepDir, owner: type | None = None) -> Path:
        return instance.path / self.name


def _writable(path: Path) -> bool:
    """Whether this process may write ``path`` (and enter it, a folder), by its effective
    ids and capabilities (``faccessat(AT_EACCESS)`` where the platform has it)."""
    mode = os.W_OK | (os.X_OK if path.is_dir() else 0)
    if os.access in os.supports_effective_ids:
        return os.access(path, mode, effective_ids=True)
    return os.access(path, mode)


class _Folder:
    """A folder given by its path; ``os.PathLike`` (``Path(folder)`` and ``open``-style APIs
    take it) and ``str(folder)`` is its path."""

    path: Path
    KIND: ClassVar[str] = "folder"

    def __init__(self, path: PathLike):
        object.__setattr__(self, "path", Path(path))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    WRITTEN: ClassVar[tuple[str, ...]] = ()  # files and folders in it written in place

    def check_usable(self) -> None:
        """:class:`InputError <sparsejax.errors.InputError>` naming the path when it (or its
        nearest existing parent) is not a folder, so it cannot be, or become, one; or when
        this process cannot write it (the folder, or the nearest existing parent it would be
        made in, or a file in it written in place, is read-only: its permissions, a
        read-only file system)."""
        existing = next((p for p in (self.path, *self.path.parents) if p.exists()), None)
        if existing is None:
            return
        if not existing.is_dir():
            what = "it" if existing == self.path else str(existing)
            raise errors.InputError(f"{self.path} cannot be a {self.KIND}: {what} is not a "
                                    "folder; use another --workdir")
        inside = [self.path / name for name in self.WRITTEN] if existing == self.path else []
        for path in (existing, *inside):
            if path.exists() and not _writable(path):
                what = "it" if path == self.path else str(path)
                raise errors.InputError(
                    f"{self.path} cannot be written as a {self.KIND}: {what} is read-only for "
                    f"this user; make it writable (chmod u+w {path}) or use another --workdir")

    def create(self) -> Self:
        """Make the folder (and its parents), :meth:`check_usable` first; returns ``self``."""
        self.check_usable()
        self.path.mkdir(parents=True, exist_ok=True)
        return self


@dataclasses.dataclass(frozen=True, init=False)
class RunDir(_Folder):
    """A run directory (``RunDir("runs/x")``): every file name in it, and its files' IO."""

    path: Path
    KIND: ClassVar[str] = "run dir"

    CONFIG: ClassVar[str] = "config.json"
    METRICS: ClassVar[str] = "metrics.jsonl"
    SUMMARY: ClassVar[str] = "summary.json"
    WORKER: ClassVar[str] = "worker.json"
    WORKER_LOG: ClassVar[str] = "worker.log"
    LOCK: ClassVar[str] = "lock"
    CHECKPOINTS: ClassVar[str] = "checkpoints"
    DAMAGED_CHECKPOINTS: ClassVar[str] = "damaged_checkpoints"
    WANDB_ID: ClassVar[str] = "wandb_id"
    ONESHOT: ClassVar[str] = "oneshot.json"
    ONESHOT_PLOT: ClassVar[str] = "oneshot.png"
    EXPORT: ClassVar[str] = "export"
    NAMES: ClassVar[tuple[str, ...]] = (
        CONFIG, METRICS, SUMMARY, WORKER, WORKER_LOG, LOCK, CHECKPOINTS, DAMAGED_CHECKPOINTS,
        WANDB_ID, ONESHOT, ONESHOT_PLOT, EXPORT)
    WRITTEN: ClassVar[tuple[str, ...]] = (METRICS, LOCK, CHECKPOINTS, DAMAGED_CHECKPOINTS)

    # -- paths (each ``self.path / NAME``) ---------------------------------------------------
    config_file = _In(CONFIG)
    metrics_file = _In(METRICS)
    summary_file = _In(SUMMARY)
    worker_file = _In(WORKER)
    worker_log = _In(WORKER_LOG)
    lock_file = _In(LOCK)
    checkpoints = _In(CHECKPOINTS)  # orbax: one folder per step, named by the step
    damaged_checkpoints = _In(DAMAGED_CHECKPOINTS)
    wandb_id_file = _In(WANDB_ID)
    oneshot_file = _In(ONESHOT)
    oneshot_plot = _In(ONESHOT_PLOT)
    export_dir = _In(EXPORT)

    def has_summary(self) -> bool:
        """Whether it holds a ``summary.json`` (a run trained, or is training, here; one that
        is no file is an error when read)."""
        return self.summary_file.exists()

    def check_files(self) -> None:
        """Read ``config.json``, ``summary.json`` and ``metrics.jsonl`` as the commands do,
        so one that cannot be read or holds the wrong JSON type is an :class:`InputError
        <sparsejax.errors.InputError>` naming it (and the key) before anything is written.
        Unreadable metrics lines warn when the log is read for use, not here."""
        self.read_config()
        self.read_summary()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.read_metrics()

    # -- config.json, summary.json, worker.json, wandb_id ------------------------------------
    def read_config(self) -> dict[str, Any] | None:
        """The stored config as a plain dict, ``None`` when there is none."""
        return read_json(self.config_file, "restore it (train refuses checkpoints without "
                         "their config), or use another --workdir")

    def write_config(self, config: dict[str, Any]) -> None:
        write_json(self.config_file, config)

    def read_summary(self) -> dict[str, Any] | None:
        """The summary, ``None`` when there is none; :class:`InputError
        <sparsejax.errors.InputError>` naming the file and key when a field the commands read
        (status, steps, losses, wall time, error) has the wrong type."""
        fix = "restore it, or delete it (train writes it again, resuming from the checkpoints)"
        obj = read_json(self.summary_file, fix)
        if obj is None:
            return None
        return _check_fields(obj, self.summary_file, fix, ints=SUMMARY_INTS,
                             numbers=SUMMARY_NUMBERS, strings=("error",),
                             choices={"status": STATUSES})

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary_file, summary)

    def read_worker(self) -> WorkerRecord | None:
        """The sweep worker's record, ``None`` when there is none (or the file holds no
        worker record)."""
        try:
            obj = read_json(self.worker_file)
        except errors.InputError:
            return None
        if obj is None or not isinstance(obj.get("exit"), int):
            return None
        return WorkerRecord(**{k: obj.get(k) for k in WorkerRecord._fields})

    def write_worker(self, record: WorkerRecord) -> None:
        write_json(self.worker_file, record._asdict())

    def clear_worker(self) -> None:
        """Remove the previous worker's record (before a new worker starts)."""
        self.worker_file.unlink(missing_ok=True)

    def read_wandb_id(self) -> str | None:
        try:
            return self.wandb_id_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def write_wandb_id(self, run_id: str) -> None:
        files.write_atomic(self.wandb_id_file, run_id)

    # -- metrics.jsonl -----------------------------------------------------------------------
    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl`` as an uninterrupted run logs them: records a
        resume superseded are dropped, an unreadable line is skipped with a warning naming
        the file and line, a torn last line is ignored (:func:`sparsejax.run.files.
        read_log`)."""
        return files.read_log(self.metrics_file, _numbers_ok)

    def last_logged_step(self) -> int:
        """The last logged step (read from the tail of ``metrics.jsonl``), 0 when none."""
        return files.last_step(self.metrics_file)

    def metrics_log(self, *, resume_step: int) -> MetricsLog:
        """The append-only writer of ``metrics.jsonl`` for a run that starts at
        ``resume_step`` (records past it are superseded, never deleted)."""
        return MetricsLog(self.metrics_file, resume_step=resume_step)

    # -- lock, checkpoints, status -----------------------------------------------------------
    def lock(self) -> RunLock:
        return RunLock(self)

    def lock_owner(self) -> int | None:
        return lock_owner(self)

    def checkpoint_steps(self) -> list[int]:
        """The committed checkpoint steps, ascending: the step folders orbax finalized (named
        by the step; one in progress is named ``STEP.orbax-checkpoint-tmp-...``)."""
        try:
            return sorted(int(p.name) for p in self.checkpoints.iterdir()
                          if p.name.isdigit() and p.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def latest_checkpoint_step(self) -> int | None:
        steps = self.checkpoint_steps()
        return steps[-1] if steps else None

    def status(self) -> RunStatus:
        """What the files say: status, the latest logged step with its loss, wall time, the
        latest committed checkpoint (the step the same command resumes from), the run's steps
        and a failed run's error. A ``running`` run whose process is gone reads as
        ``interrupted``."""
        summary = self.read_summary() or {}
        records = self.read_metrics()
        last = records[-1] if records else summary
        status = summary.get("status", "unknown")
        if status == "running" and self.lock_owner() is None:
            status = "interrupted"
        step = last.get("step") if records else summary.get("logged_step", summary.get("step"))
        loss = last.get("val_loss")
        if loss is None:
            loss = last.get("train_loss")
        walls = [number(r.get("wall_time_s")) for r in (summary, last)]
        wall = max((w for w in walls if w is not None), default=None)
        return RunStatus(status, step, number(loss), wall, self.latest_checkpoint_step(),
                         summary.get("steps"), summary.get("error"))


@dataclasses.dataclass(frozen=True, init=False)
class SweepDir(_Folder):
    """A folder of run dirs: a sweep (``sweep.json``, its ``lock``) or a soup (``soup.json``)."""

    path: Path
    KIND: ClassVar[str] = "sweep dir"

    SWEEP: ClassVar[str] = "sweep.json"
    SOUP: ClassVar[str] = "soup.json"
    NAMES: ClassVar[tuple[str, ...]] = (SWEEP, SOUP)

    sweep_file = _In(SWEEP)
    soup_file = _In(SOUP)

    def run(self, name: str) -> RunDir:
        return RunDir(self.path / name)

    def runs(self) -> list[RunDir]:
        """Its run dirs (sub-folders holding a ``summary.json``), by name."""
        return sorted((RunDir(p) for p in self.path.iterdir() if RunDir(p).has_summary()),
                      key=lambda r: r.name)

    def lock(self) -> RunLock:
        return RunLock(self.path)

    def lock_owner(self) -> int | None:
        return lock_owner(self.path)

    def read_sweep(self) -> dict[str, Any] | None:
        """``sweep.json``, ``None`` when there is none; :class:`InputError
        <sparsejax.errors.InputError>` naming it when it is not ``{"runs": [{"name": ...},
        ...]}`` (a run's name and status strings)."""
        fix = "delete it (the next sweep launch writes it again from the recipe's runs)"
        book = read_json(self.sweep_file, fix)
        if book is None:
            return None
        runs = book.get("runs", [])
        if not isinstance(runs, list):
            raise errors.InputError(f"{self.sweep_file}: 'runs' must be a list of run entries, "
                                    f"got {runs!r:.60}; {fix}")
        for i, entry in enumerate(runs):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise errors.InputError(f"{self.sweep_file}: runs[{i}] must be an object with a "
                                        f"string 'name', got {entry!r:.60}; {fix}")
            _check_fields(entry, self.sweep_file, fix, strings=("status", "reason", "action"))
        return book

    def check_files(self) -> None:
        """Read ``sweep.json`` as the commands do (:meth:`read_sweep`), before anything is
        written."""
        self.read_sweep()

    def write_sweep(self, book: dict[str, Any]) -> None:
        write_json(self.sweep_file, book)

    def write_soup(self, result: dict[str, Any]) -> None:
        write_json(self.soup_file, result)


def _numbers_ok(record: dict[str, Any]) -> bool:
    """Whether a metrics record's logged fields are numbers (or null): a record that is not
    is skipped as an unreadable line."""
    return all(record.get(k) is None or _is_number(record[k]) for k in METRIC_FIELDS)


def read_metrics(run_dir: PathLike) -> list[dict[str, Any]]:
    """All records of ``run_dir``'s ``metrics.jsonl`` (:meth:`RunDir.read_metrics`)."""
    return RunDir(run_dir).read_metrics()


def run_status(run_dir: PathLike) -> RunStatus:
    """:meth:`RunDir.status` of ``run_dir``."""
    return RunDir(run_dir).status()


class NullLog:
    """The :class:`MetricsLog` of a process that writes no files (every process but 0 of a
    multi-process run)."""

    def write(self, record: dict[str, Any]) -> None:
        del record

    def close(self) -> None:
        pass


def duration(seconds: float) -> str:
    """``"4m05s"``, or ``"2h07m"`` from an hour on."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


class Progress:
    """Training progress on ``stream`` (default stderr): on a terminal a tqdm bar, its postfix
    the latest logged fields; elsewhere (a log file, a pipe, a cluster job's output, where a
    bar's carriage returns show nothing useful) one plain line per update, i.e. per log step:
    ``step S/N (P%) key=value ... | 1m02s elapsed, ETA 3m10s``. ``enabled=False``: nothing."""

    def __init__(self, total: int, *, initial: int = 0, stream: TextIO | None = None,
                 enabled: bool = True):
        self._stream = stream or sys.stderr
        self._plain = enabled and not self._stream.isatty()
        self._total, self._start, self._t0 = total, initial, time.monotonic()
        self._bar = tqdm(total=total, initial=initial, unit="step", file=self._stream,
                         disable=not enabled or self._plain, dynamic_ncols=True, mininterval=0.5)

    def update(self, step: int, **fields: Any) -> None:
        """Advance to ``step``; ``fields`` (``None`` ones dropped) become the postfix."""
        shown = {k: f"{v:.4g}" if isinstance(v, float) else v
                 for k, v in fields.items() if v is not None}
        if self._plain:
            elapsed = time.monotonic() - self._t0
            done = step - self._start
            eta = duration(elapsed * (self._total - step) / done) if done > 0 else "?"
            pairs = " ".join(f"{k}={v}" for k, v in shown.items())
            self._stream.write(f"step {step}/{self._total} ({100 * step // self._total}%) "
                               f"{pairs} | {duration(elapsed)} elapsed, ETA {eta}\n")
            self._stream.flush()
            return
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()


class RunLock:
    """An exclusive lock on a run dir or sweep dir (its ``lock`` file, holding the owner's PID).

    ``flock`` is released by the kernel when its process dies, so a lock file left by a killed
    process is taken over; one held by a live process raises :class:`RunDirBusyError` naming
    its PID. The file is opened with ``O_NOFOLLOW`` (a link planted there is an
    :class:`~sparsejax.errors.InputError`, never followed) and only written once locked.
    """

    def __init__(self, run_dir: PathLike):
        self.path = RunDir(run_dir).lock_file
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        while True:
            fd = files.open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirBusyError(
                    f"run dir {self.path.parent} is in use by process {pid} (lock file "
                    f"{self.path}); wait for it to end or stop it") from None
            try:  # the file we locked may have been unlinked by its previous owner
                same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def lock_owner(run_dir: PathLike) -> int | None:
    """The PID of the live process holding ``run_dir``'s lock, or ``None``."""
    path = RunDir(run_dir).lock_file
    try:
        fd = files.open_nofollow(path, os.O_RDONLY)
    except (FileNotFoundError, errors.InputError):  # none, or a link: no lock
        return None
    try:
        pid = int(os.pread(fd, 64, 0).decode(errors="replace").strip())
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return None
    except PermissionError:  # alive, owned by another user
        pass
    finally:
        os.close(fd)
    return pid
