"""The framework's error types: what went wrong decides the exit status, never the message.

* :class:`ConfigError` (a bad config key or value) and :class:`InputError` (a bad file, run
  dir, export or command-line value) are the user's to fix: the CLI prints one line and exits
  with status 2. Both are ``ValueError`` s, so code that caught ``ValueError`` keeps working;
  :class:`MissingInputError` is also a ``FileNotFoundError``.
* :class:`RunFailed` is a run that started and did not complete: status ``failed`` (e.g.
  :class:`ExactnessError`, masked weights that left 0; :class:`SaveFailed`, a checkpoint that
  could not be written) or ``diverged`` (:class:`RunDiverged`). The CLI exits with status 1 and
  names the status.
* ``KeyboardInterrupt`` (Ctrl-C) and :class:`Interrupted` (SIGINT or SIGTERM while training,
  a ``KeyboardInterrupt``) leave a run ``interrupted``: exit status 130 (SIGINT), 143
  (SIGTERM), as a shell reports a process those signals ended.

The Optax library on the top level raises plain ``ValueError``/``TypeError`` for bad
arguments, like optax; only its "no sparsify state in this optimizer state" case has a type
(:class:`NoSparsifyState`), because the framework tells it apart from a composition error.
"""

from __future__ import annotations

EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class SparsejaxError(Exception):
    """Base of the framework's errors; ``exit_code`` is the CLI's exit status for it."""

    exit_code: int = EXIT_RUN_FAILED


class ConfigError(SparsejaxError, ValueError):
    """A config key or value out of its valid range (the message names the key and the range)."""

    exit_code = EXIT_USAGE


class InputError(SparsejaxError, ValueError):
    """A file, run dir, export or command-line value that cannot be used as given (the message
    names it and the fix)."""

    exit_code = EXIT_USAGE


class MissingInputError(InputError, FileNotFoundError):
    """A run dir, config file or checkpoint that does not exist."""


class RunDirBusyError(InputError):
    """Another live process holds the run dir's (or sweep dir's) lock."""


class RunFailed(SparsejaxError):
    """A run that started and did not complete; ``status`` is what its ``summary.json`` says."""

    status: str = "failed"


class RunDiverged(RunFailed):
    """The training loss (or an update) became non-finite."""

    status = "diverged"


class ExactnessError(RunFailed):
    """Weights a mask prunes are not exactly 0: the optimizer does not keep its masks exact."""


class SaveFailed(RunFailed):
    """A checkpoint could not be written (the ``checkpoints`` folder is not a folder, the disk
    is full, permissions): the run stops, status ``failed``, with the reason."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by ``signum`` (SIGINT or SIGTERM; :mod:`sparsejax.run.signals`):
    ``at_once`` when a second signal cut it short instead of the next step boundary.
    ``exit_code`` is ``128 + signum``."""

    def __init__(self, signum: int, at_once: bool = False):
        super().__init__(signum, at_once)
        self.signum, self.at_once = signum, at_once
        self.exit_code = 128 + signum


class NoSparsifyState(ValueError):
    """An optimizer state without a ``sparsify`` state (a dense optimizer)."""
