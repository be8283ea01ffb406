"""Run-directory logs: ``metrics.jsonl``, ``summary.json``, ``config.json``, progress output.

DESIGN.md, "Run directory". ``metrics.jsonl`` holds one JSON object per logged step; on resume,
records past the restored checkpoint are dropped, so a resumed run's log equals an
uninterrupted one's.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

METRIC_FIELDS = (
    "step", "tokens", "train_loss", "val_loss", "lr", "sparsity", "target_sparsity", "density",
    "n_params", "n_active", "n_avg", "flops", "step_time_s",
)
TIMING_FIELDS = ("step_time_s", "tokens_per_s", "wall_time_s")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write atomically (temp file + rename) so a kill never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({k: _clean(v) for k, v in obj.items()}, indent=2, sort_keys=True))
    os.replace(tmp, path)


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
    """Append-only ``metrics.jsonl`` writer."""

    def __init__(self, run_dir: Path, *, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file: TextIO = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Progress:
    """A one-line progress bar on a terminal; plain lines otherwise (logs, CI, notebooks)."""

    def __init__(self, total: int, *, stream: TextIO | None = None, enabled: bool = True):
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, step: int, **fields: Any) -> None:
        if not self.enabled:
            return
        parts = []
        for k, v in fields.items():
            if v is None:
                continue
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
        frac = step / max(self.total, 1)
        if self.tty:
            bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
            self.stream.write(f"\r[{bar}] {step}/{self.total} " + " ".join(parts) + "\x1b[K")
        else:
            self.stream.write(f"step {step}/{self.total} " + " ".join(parts) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
