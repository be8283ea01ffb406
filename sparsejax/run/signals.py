"""Signals during training: SIGINT (Ctrl-C) and SIGTERM (a cluster's preemption: SLURM,
Kubernetes, TPU maintenance) stop a run at a step boundary, after a checkpoint of that step.

docs/design.md, "Run directory". While a run sets up (restores, compiles), the first signal
stops it at once (:class:`~sparsejax.errors.Interrupted`): nothing is in flight. Once the loop
runs (:meth:`DeferredInterrupt.defer`), the first signal only sets :attr:`DeferredInterrupt.
signum`; the loop saves a checkpoint at the next step boundary and :meth:`DeferredInterrupt.
check` raises there, so a checkpoint save is never cut midway. A second signal raises at once
(``at_once``: no checkpoint of the step in progress; a save already in flight still completes,
as the process cannot exit before orbax's writer threads end) and gives both signals their
default action back, so a third one ends the process whatever it is doing.
"""

from __future__ import annotations

import signal
import threading
from types import TracebackType

from sparsejax.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DeferredInterrupt:
    """SIGINT and SIGTERM handlers for a training run (module docstring); a context manager
    that puts the previous handlers back. Only installed in the main thread (elsewhere
    :meth:`check` never raises)."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received
        self.deferring = False
        self.previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def __enter__(self) -> DeferredInterrupt:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.restore()

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None or not self.deferring:
            at_once = self.signum is not None
            if at_once:  # a third signal takes its default action, whatever runs
                for s in SIGNALS:
                    signal.signal(s, signal.SIG_DFL)
            self.signum = signum
            raise Interrupted(signum, at_once=at_once)
        self.signum = signum

    def defer(self) -> None:
        """From now on the first signal waits for :meth:`check` (the loop's step boundary)."""
        self.deferring = True

    @property
    def pending(self) -> bool:
        """Whether a signal arrived that :meth:`check` has not raised yet."""
        return self.signum is not None

    def check(self) -> None:
        """Raise :class:`~sparsejax.errors.Interrupted` when a signal arrived."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    def restore(self) -> None:
        """Put back the handlers found at construction."""
        for s, previous in self.previous.items():  # None: a handler not set from Python
            signal.signal(s, signal.SIG_DFL if previous is None else previous)
        self.previous = {}
