"""Checkpoint saves that fail loudly: a save orbax could not write ends the run.

docs/design.md, "Run directory". Orbax writes a checkpoint in background threads; a save that
fails there (the ``checkpoints`` folder is a file, a full disk, permissions) surfaces at the
next save or wait, and the failed save's other threads keep waiting for a signal from the step
that failed: orbax's 300 s coordination timeout, and Python joins them at exit, so the process
printed an error and did not exit. :func:`save_checked` and :func:`wait_for_saves` raise
:class:`~sparsejax.errors.SaveFailed` naming the folder and the cause instead, after waking
those threads (cancelled, they end without running).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import orbax.checkpoint as ocp

from sparsejax import errors
from sparsejax.run import checkpoint

try:  # the background threads of a save (private: released when a save failed)
    from orbax.checkpoint._src.futures import future as _ocp_future
except ImportError:  # another orbax layout: a failed save waits out orbax's timeout at exit
    _ocp_future = None


def save_checked(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
    """:func:`sparsejax.run.checkpoint.save`, raising :class:`~sparsejax.errors.SaveFailed`
    when this save or the one before it (still finishing in the background) failed."""
    with _save_errors(mngr):
        checkpoint.save(mngr, step, state)


def wait_for_saves(mngr: ocp.CheckpointManager) -> None:
    """Wait for the saves in flight; :class:`~sparsejax.errors.SaveFailed` when one failed."""
    with _save_errors(mngr):
        mngr.wait_until_finished()


@contextlib.contextmanager
def _save_errors(mngr: ocp.CheckpointManager) -> Iterator[None]:
    try:
        yield
    except Exception as err:
        _release_failed_save()
        why = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        raise errors.SaveFailed(f"saving a checkpoint in {mngr.directory} failed ({why}); "
                                "fix the folder (space, permissions, a file in its place) and "
                                "run the same command to resume") from err


def _release_failed_save() -> None:
    """Wake the background threads of a failed save: each waits for a signal from a step that
    failed and will never send it (module docstring); cancelled, they end without running."""
    kind = getattr(_ocp_future, "_SignalingThread", None)
    if kind is None:
        return
    for thread in threading.enumerate():
        if isinstance(thread, kind) and thread.is_alive():
            thread.cancel()
            try:
                _ocp_future.set_signals(thread._receive_signals,
                                        operation_id=thread._operation_id)
            except Exception as err:  # a changed orbax: it then waits out its timeout
                warnings.warn(f"could not release a failed checkpoint save's thread: {err}",
                              stacklevel=2)
