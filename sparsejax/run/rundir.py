"""Run-directory files: ``metrics.jsonl``, ``summary.json``, ``config.json``, the lock, progress.

DESIGN.md, "Run directory". ``metrics.jsonl`` holds one JSON object per logged step; on resume,
records past the restored checkpoint are dropped (the file is replaced atomically), so a
resumed run's log equals an uninterrupted one's.

Non-finite floats are written as the JSON strings ``"nan"``, ``"inf"`` and ``"-inf"`` (JSON has
no such numbers); ``float(value)`` reads them back, and :func:`number` does so for any field.
A run whose loss became non-finite has ``"status": "diverged"`` and ``"diverged_step"`` in its
``summary.json``.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

METRIC_FIELDS = (
    "step", "tokens", "train_loss", "val_loss", "val_loss_se", "lr", "sparsity",
    "target_sparsity", "density",
    "n_params", "n_active", "n_avg", "flops", "step_time_s", "wall_time_s",
)
TIMING_FIELDS = ("step_time_s", "tokens_per_s", "wall_time_s")
STATUSES = ("running", "completed", "failed", "diverged", "interrupted")
LOCK_FILE = "lock"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def number(value: Any) -> float | None:
    """A logged numeric field as a float (``"nan"``/``"inf"`` strings included); ``None`` stays
    ``None``."""
    return None if value is None else float(value)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write atomically (temp file + rename) so a kill never leaves half a file."""
    _write_atomic(path, json.dumps(_clean(obj), indent=2, sort_keys=True, allow_nan=False))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The object in ``path``, or ``None`` when the file does not exist."""
    return json.loads(path.read_text()) if path.exists() else None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``run_dir/metrics.jsonl`` (a torn last line is ignored)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


class MetricsLog:
    """Append-only ``metrics.jsonl`` writer; opening it drops records past ``resume_step``."""

    def __init__(self, run_dir: Path, *, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
        _write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file: TextIO = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(_clean(record), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class NullLog:
    """The :class:`MetricsLog` of a process that writes no files (every process but 0 of a
    multi-process run)."""

    def write(self, record: dict[str, Any]) -> None:
        del record

    def close(self) -> None:
        pass


class Progress:
    """A tqdm bar over training steps, its postfix showing the latest logged fields."""

    def __init__(self, total: int, *, initial: int = 0, stream: TextIO | None = None,
                 enabled: bool = True):
        self._bar = tqdm(total=total, initial=initial, unit="step", file=stream or sys.stderr,
                         disable=not enabled, dynamic_ncols=True, mininterval=0.5)

    def update(self, step: int, **fields: Any) -> None:
        """Advance to ``step``; ``fields`` (``None`` ones dropped) become the postfix."""
        self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v
                               for k, v in fields.items() if v is not None}, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()


class RunDirBusyError(RuntimeError):
    """Another live process trains in the run dir."""


class RunLock:
    """An exclusive lock on a run dir (``RUN_DIR/lock``, holding the owner's PID).

    ``flock`` is released by the kernel when its process dies, so a lock file left by a killed
    process is taken over; one held by a live process raises :class:`RunDirBusyError` naming
    its PID.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirBusyError(
                    f"run dir {self.path.parent} is in use by process {pid} (lock file "
                    f"{self.path}); wait for it to end or stop it") from None
            try:  # the file we locked may have been unlinked by its previous owner
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
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


def lock_owner(run_dir: Path) -> int | None:
    """The PID of the live process holding ``run_dir``'s lock, or ``None``."""
    try:
        pid = int((Path(run_dir) / LOCK_FILE).read_text().strip())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    except PermissionError:  # alive, owned by another user
        pass
    return pid


def run_status(run_dir: Path) -> dict[str, Any]:
    """What a run dir's files say: status, step, loss, wall time.

    A ``running`` run whose process is gone reads as ``interrupted`` at its last checkpoint
    (the step the same command resumes from)."""
    from sparsejax.run import checkpoint

    summary = read_json(run_dir / "summary.json") or {}
    records = read_metrics(run_dir)
    last = records[-1] if records else {}
    status = summary.get("status", "unknown")
    step = summary.get("step", last.get("step"))
    if status == "running":
        if lock_owner(run_dir) is None:
            status, step = "interrupted", checkpoint.latest_step(run_dir) or 0
        else:
            step = last.get("step", step)
    loss = summary.get("val_loss", last.get("val_loss"))
    if loss is None:
        loss = summary.get("train_loss", last.get("train_loss"))
    wall = summary.get("wall_time_s", last.get("wall_time_s"))
    return {"status": status, "step": step, "loss": number(loss), "wall_time_s": number(wall)}
