"""Where a training run reports: ``metrics.jsonl`` and ``summary.json`` (through
:class:`~sparsejax.run.rundir.RunDir`), the progress bar and wandb. Only process 0 of a
multi-process job writes; the others keep their records in memory.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, NamedTuple

from sparsejax.run import rundir
from sparsejax.run.rundir import RunDir
from sparsejax.run.spec import RunSpec


class Clock(NamedTuple):
    """A run's wall time across resumptions."""

    t_start: float  # perf_counter at the start of this process's part of the run
    wall_base: float  # wall time of earlier parts (resumptions add up)

    def wall(self) -> float:
        return self.wall_base + time.perf_counter() - self.t_start


class Outputs:
    """Where a run reports: ``metrics.jsonl``, ``summary.json``, the progress bar and wandb
    (process 0 only; other processes of a multi-process job write nothing)."""

    def __init__(self, run: RunDir, main: bool, log: Any, bar: rundir.Progress, wb: Any,
                 summary_base: dict[str, Any]):
        self.run, self.main, self.log, self.bar, self.wb = run, main, log, bar, wb
        self.summary_base = summary_base
        self.last_record: dict[str, Any] = {}  # the latest logged record of this process

    @classmethod
    def open(cls, spec: RunSpec, run: RunDir, *, start: int, counts: Any, final_eval: Any,
             main: bool, progress: bool) -> Outputs:
        t, fv = spec.train, final_eval
        base = {"n_params": counts.n_params, "n_prunable": counts.n_prunable,
                "steps": t.steps, "batch_size": t.batch_size, "seq_len": t.seq_len,
                "eval_seed": spec.eval.seed, "eval_sequences": fv.xs.shape[0] * fv.xs.shape[1],
                "eval_sha256": fv.sha256}
        log = run.metrics_log(resume_step=start) if main else rundir.NullLog()
        bar = rundir.Progress(t.steps, initial=start, enabled=progress and main)
        wb = wandb_start(spec.wandb.to_dict(), run, spec.to_dict()) if main else None
        out = cls(run, main, log, bar, wb, base)
        out.write_summary({"status": "running", "step": start})
        return out

    def write_summary(self, fields: dict[str, Any]) -> None:
        if self.main:
            self.run.write_summary({**self.summary_base, **fields})

    def interrupted(self, step: int, resumed_from: int, wall: float) -> None:
        """Status ``interrupted`` at checkpoint ``step`` (the step a resume starts from); the
        latest logged step is ``logged_step``."""
        self.write_summary({**self.last_record, "status": "interrupted",
                            "logged_step": self.last_record.get("step"), "step": step,
                            "resumed_from": resumed_from, "wall_time_s": wall})

    def failed(self, err: BaseException, wall: float) -> None:
        """Status ``failed``, the exception's type and message (one line) in ``error``."""
        self.write_summary({**self.last_record, "status": "failed", "wall_time_s": wall,
                            "error": " ".join(f"{type(err).__name__}: {err}".split())})

    def record(self, record: dict[str, Any]) -> None:
        self.last_record = record
        self.log.write(record)

    def report(self, record: dict[str, Any], tokens_per_s: float) -> None:
        if self.wb is not None:
            self.wb.log({k: v for k, v in record.items() if v is not None}, step=record["step"])
        self.bar.update(record["step"], loss=record["train_loss"], val=record["val_loss"],
                        target=record["target_sparsity"], sparsity=record["sparsity"],
                        tok_s=round(tokens_per_s))

    def close(self) -> None:
        self.bar.close()
        self.log.close()
        if self.wb is not None:
            self.wb.finish()


def wandb_start(cfg: dict[str, Any] | None, run: RunDir, config: dict[str, Any] | None):
    """Start wandb when enabled (default offline: no network unless mode='online')."""
    if not cfg or not cfg.get("enabled"):
        return None
    import wandb  # imported lazily: heavy, and unused unless enabled

    run_id = run.read_wandb_id() or uuid.uuid4().hex[:12]
    run.write_wandb_id(run_id)
    return wandb.init(project=cfg.get("project", "sparsejax"), mode=cfg.get("mode", "offline"),
                      name=cfg.get("name") or run.name, group=cfg.get("group") or None,
                      dir=str(run), id=run_id,
                      resume="allow", config=config)
