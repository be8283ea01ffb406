"""Where numba keeps the compiled native kernels between processes, and when it may not.

Numba's on-disk cache loads pickles, so whoever can write the cache directory can run code in
every process that loads from it. The kernels are therefore cached only in a private,
per-user directory: ``$SPARSEJAX_CACHE_DIR/kernels/<hash of the kernel sources>`` (default
``SPARSEJAX_CACHE_DIR``: ``~/.cache/sparsejax``, the folder the data corpus cache also uses).
Folders created here get mode ``0o700``; if the cache root or any folder below it is a
symbolic link, is not owned by the user or is writable by group or others (read with
``lstat``: never through a link), or a folder above the root is writable by group or others
without the sticky bit (anyone could rename the root away and put their own in its place), the
disk cache is refused (one warning) and the kernels are compiled in every process instead (a
few seconds).

The key covers every source file compiled into the cached drivers (numba's own key covers
only the file that defines them, plus numba's version and the CPU), so editing the
micro-kernel recompiles them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import warnings
from pathlib import Path

ENV = "SPARSEJAX_CACHE_DIR"


def cache_root() -> Path:
    """``$SPARSEJAX_CACHE_DIR``, else ``~/.cache/sparsejax``."""
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "sparsejax")


def unsafe_reason(path: Path) -> str | None:
    """Why ``path`` must not hold code that will be loaded (None: a folder, not a link, owned
    by this user and not writable by group or others)."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        return f"{path} is a symbolic link (set {ENV} to the folder it points to)"
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a folder"
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"{path} is owned by uid {info.st_uid}, not by this user"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def parent_reason(root: Path) -> str | None:
    """Why a folder above ``root`` (its real path) lets others replace ``root``: writable by
    group or others without the sticky bit (None: none does)."""
    for parent in (above := Path(os.path.realpath(root.parent)), *above.parents):
        mode = parent.lstat().st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
            return (f"{parent} is writable by group or others and has no sticky bit (mode "
                    f"{stat.S_IMODE(mode):o}): anyone could replace {root} below it")
    return None


def private_dir(root: Path, *parts: str) -> tuple[Path | None, str]:
    """Create ``root/parts...`` (missing folders with mode 0o700) and make the last one 0o700,
    so nobody else can even look below it; returns ``(path, "")`` when no folder above the root
    lets others replace it (:func:`parent_reason`) and the root and every folder below it are
    the user's own and not writable by group or others, else ``(None, reason)``."""
    folders = [root]
    for part in parts:
        folders.append(folders[-1] / part)
    path = root
    try:
        reason = parent_reason(root)
        if reason:
            return None, reason
        for path in folders:
            if not path.is_dir():
                path.mkdir(mode=0o700, parents=path is root)
            reason = unsafe_reason(path)
            if reason:
                return None, reason
        folders[-1].chmod(0o700)  # what numba creates below inherits the umask, not this mode
    except OSError as err:
        return None, f"cannot create {path}: {err}"
    return folders[-1], ""


@functools.cache
def kernel_cache_dir(*sources: Path, what: str = "native CPU kernels") -> Path | None:
    """The private cache folder for drivers compiled from ``sources`` (None, after one
    warning naming ``what``, when the disk cache is refused). ``scaling``'s compiled solver
    passes use it too: one cache variable and one safety rule for all compiled code."""
    digest = hashlib.sha256()
    for src in sources:
        digest.update(Path(src).read_bytes())
    path, reason = private_dir(cache_root(), "kernels", digest.hexdigest()[:16])
    if path is None:
        warnings.warn(
            f"{what} are not cached on disk ({reason}); set {ENV} to a folder "
            "only you can write",
            RuntimeWarning,
            stacklevel=2,
        )
    return path


def enable(dispatchers, path: Path) -> None:
    """Give numba ``dispatchers`` (njit functions, not yet compiled) an on-disk cache in
    ``path``."""
    from numba.core import config

    saved = config.CACHE_DIR
    config.CACHE_DIR = str(path)  # read once, when each dispatcher's cache locator is made
    try:
        for d in dispatchers:
            d.enable_caching()
    finally:
        config.CACHE_DIR = saved
