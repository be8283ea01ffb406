"""Safe file IO under :mod:`sparsejax.run.rundir`: atomic writes through unique temp files,
opens that refuse symbolic links, and the append-only JSON-lines log (``metrics.jsonl``).

docs/design.md, "Run directory". Nothing here names a run-dir file; :class:`RunDir
<sparsejax.run.rundir.RunDir>` passes the paths.

* :func:`write_atomic` writes a unique temp file in the target's folder
  (``tempfile.mkstemp``: created with ``O_EXCL``, so a link planted at any name is never
  followed), fsyncs it and ``os.replace`` s the target (which replaces a link at the target
  rather than writing through it). The file gets the mode an ordinary ``open`` would give
  (``0o666`` less the umask).
* :func:`open_nofollow` opens with ``O_NOFOLLOW``: a symbolic link planted at a run-dir file
  (the lock, the metrics log) is an :class:`~sparsejax.errors.InputError` naming it, never a
  write into the file it points to.
* The metrics log (:class:`JsonLog`, :func:`read_log`, :func:`last_step`) is append-only and
  never rewritten: one JSON object per line, each a record with an integer ``step``, or a
  resume marker ``{"resume_from": S}``, appended when a run resumes from step ``S`` while the
  log holds records past ``S``. A reader drops the records past ``S`` that came before the
  marker (they are superseded: the resumed run logs those steps again), so what it returns is
  what an uninterrupted run logs, while the file keeps every line ever written. A line that
  does not parse is skipped with a warning naming the file and line; an unterminated last line
  (a writer killed mid-line, or one still writing) is ignored, and cut off before the next
  append when it does not parse. A file none of whose lines is a record or a marker (a JSON
  array, a pretty-printed object, binary data) is no log at all: an
  :class:`~sparsejax.errors.InputError` naming it, and so is a log that is a folder or cannot
  be read.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import stat
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsejax import errors

RESUME = "resume_from"  # the key of a resume marker line


def clean(value: Any) -> Any:
    """``value`` with non-finite floats as the strings ``"nan"``, ``"inf"``, ``"-inf"``
    (JSON has no such numbers), in nested dicts and lists too."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


@functools.cache
def umask() -> int:
    """The process's umask (read from ``/proc`` where it can be, so it is never changed)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that never follows a symbolic link at ``path`` (an
    :class:`~sparsejax.errors.InputError` naming it) and refuses anything but a regular file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise errors.InputError(f"{path} is a symbolic link, not a file; remove it (a "
                                    "run dir's files are never links)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise errors.InputError(f"{path} is not a regular file; remove it")
    return fd


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text``, atomically: a kill leaves the old file or
    the new one, never half of one, and no link at ``path`` or elsewhere is followed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parse(line: bytes, check: Callable[[dict[str, Any]], bool] | None = None
           ) -> dict[str, Any] | None:
    """A log line's object (a record with an int ``step`` that passes ``check``, or a resume
    marker), else None."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict):
        return None
    key = RESUME if RESUME in obj else "step"
    if not isinstance(obj.get(key), int) or isinstance(obj[key], bool):
        return None
    return obj if key == RESUME or check is None or check(obj) else None


def _what(line: bytes) -> str:
    """What a line that is no record holds, for an error message."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "not JSON"
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}"
    return 'a JSON object without an integer "step"'


def read_bytes(path: Path) -> bytes | None:
    """The bytes of the file at ``path``, ``None`` when there is none; an
    :class:`~sparsejax.errors.InputError` naming it when it is a folder or cannot be read."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise errors.InputError(f"{path} is a folder, not a file; move it aside") from None
    except OSError as err:
        raise errors.InputError(f"{path} cannot be read ({err.strerror}); make it readable "
                                "or move it aside") from None


def read_log(path: Path, check: Callable[[dict[str, Any]], bool] | None = None
             ) -> list[dict[str, Any]]:
    """The records of the log at ``path`` as an uninterrupted run would have written them
    (module docstring): superseded records dropped, bad lines (and records ``check`` refuses)
    skipped with a warning naming ``path:LINE``, an unterminated last line ignored. ``[]``
    when there is no file; :class:`~sparsejax.errors.InputError` naming it when no line is a
    record or marker (it is not such a log), when it is a folder or cannot be read."""
    data = read_bytes(path)
    if data is None:
        return []
    lines = data.split(b"\n")
    lines.pop()  # after the last newline: b"", or a line still (or never fully) written
    parsed = [_parse(line, check) for line in lines]
    bad = [(n, line) for n, (line, obj) in enumerate(zip(lines, parsed, strict=True), 1)
           if obj is None and line.strip()]
    if bad and len(bad) == sum(bool(line.strip()) for line in lines):
        number, line = bad[0]
        raise errors.InputError(
            f"{path} holds no record: none of its {len(bad)} line(s) is a JSON object with "
            f"an integer \"step\" (line {number} is {_what(line)}); move it aside to start "
            "a new log, or restore it")
    for number, line in bad:
        warnings.warn(f"{path}:{number}: unreadable line skipped "
                      f"({line[:60].decode(errors='replace')!r})", stacklevel=2)
    records: list[dict[str, Any]] = []
    for obj in parsed:
        if obj is None:
            continue
        if RESUME in obj:
            records = [r for r in records if r["step"] <= obj[RESUME]]
        else:
            records.append(obj)
    return records


def last_step(path: Path, window: int = 4096) -> int:
    """The step of the log's latest record, read from its last ``window`` bytes (a resume
    marker at ``S`` with no record after it: ``S``); 0 when there is none."""
    try:
        with Path(path).open("rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - window))
            lines = f.read().split(b"\n")[:-1]
    except FileNotFoundError:
        return 0
    except OSError:  # a folder, or unreadable: the error names it
        read_bytes(path)
        raise
    for line in reversed(lines):
        obj = _parse(line)
        if obj is not None:
            return obj.get(RESUME, obj.get("step"))
    return 0


class JsonLog:
    """The append-only writer of a JSON-lines log, opened by a run that starts (or resumes)
    at ``resume_step``: it cuts an unterminated last line that does not parse (with a warning;
    one that parses gets its newline) and appends a resume marker when the log holds records
    past ``resume_step``. Each record is one ``write`` to a file opened ``O_APPEND``."""

    def __init__(self, path: Path, *, resume_step: int):
        self.path = Path(path)
        self._fd: int | None = open_nofollow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            self._mend_tail()
            if any(r["step"] > resume_step for r in read_log(self.path)):
                self._append({RESUME: int(resume_step)})
        except BaseException:
            self.close()
            raise

    def _mend_tail(self) -> None:
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        if _parse(data[cut:]) is not None:
            os.write(self._fd, b"\n")
            return
        os.ftruncate(self._fd, cut)
        warnings.warn(f"{self.path}: cut a torn last line ({len(data) - cut} bytes, "
                      f"{data[cut:cut + 60].decode(errors='replace')!r})", stacklevel=3)

    def _append(self, obj: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(clean(obj), allow_nan=False) + "\n").encode())

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (one line)."""
        self._append(record)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
