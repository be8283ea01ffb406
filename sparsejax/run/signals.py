"""Signals during training: Ctrl-C takes effect at a step boundary, never inside a save."""

from __future__ import annotations

import signal
import threading


class DeferredInterrupt:
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
