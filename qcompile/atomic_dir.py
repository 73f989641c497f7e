"""Crash-safe replacement of a directory: at every instant the target is the old one or the new one.

Design (used by ``qcompile.save`` and by the model cache of ``qcompile.models.load``):

1. The writer fills a fresh directory beside the target, ``.NAME.partial-PID-RAND`` (same file
   system, so renames are atomic), then fsyncs every file and directory in it.
2. It swaps the directory in. On Linux, ``renameat2(RENAME_EXCHANGE)`` exchanges the two
   directories in one step, so the target path never stops naming a complete directory; the old
   one, now under the temporary name, is deleted. Where the exchange is unavailable (another OS,
   a file system that refuses it) the old directory is renamed aside to ``.NAME.old``, the new one
   renamed in, and the aside copy deleted. Between those two renames the target is missing, and
   ``current(target)`` answers the aside copy, which is complete: readers that go through
   ``current`` always find the old or the new directory. The parent is fsynced after each rename.
3. A writer killed at any point leaves the target complete (old or new) plus, at most, a
   ``.NAME.partial-*`` directory (removed by the next write to the same target once the process
   that made it is gone) and a ``.NAME.old`` one (read by ``current`` while the target is missing,
   removed by the next write).

Two processes writing the same target at once is not supported (one of them wins).
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Callable

__all__ = ["write_dir", "current", "fsync_tree"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# False forces the rename-aside path (tests exercise both)
USE_EXCHANGE = sys.platform.startswith("linux")


def current(target: str | os.PathLike) -> Path | None:
    """The complete directory standing for ``target``: the target itself, or the aside copy
    left by a writer killed between its two renames; None if neither exists."""
    target = Path(target)
    if os.path.lexists(target):
        return target
    aside = _aside(target)
    return aside if aside.is_dir() and not aside.is_symlink() else None


def write_dir(target: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Replace directory ``target`` by what ``fill(tmp)`` writes into an empty directory.

    If ``fill`` raises (or the process dies), ``target`` is left as it was. Returns ``target``.
    """
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise NotADirectoryError(f"{target} exists and is not a directory; remove it first")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    tmp = parent / f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(tmp)  # mode 0o777 minus the umask, like any new directory
    try:
        fill(tmp)
        fsync_tree(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def fsync_tree(root: Path) -> None:
    """fsync every regular file and directory under ``root`` (directories after their entries)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                _fsync_path(path, os.O_RDONLY)
        _fsync_dir(Path(dirpath))


def _swap_in(tmp: Path, target: Path) -> None:
    parent, aside = target.parent, _aside(target)
    if os.path.lexists(target):
        if os.path.lexists(aside):  # left by a killed writer after its second rename: stale
            shutil.rmtree(aside)
        if USE_EXCHANGE and _exchange(tmp, target):
            _fsync_dir(parent)
            shutil.rmtree(tmp)  # tmp now holds the old directory
            return
        os.rename(target, aside)
        _fsync_dir(parent)
    # target missing here: either moved aside just now, absent before, or the aside copy of a
    # writer killed between its renames (then that copy is the "old" model until this rename)
    os.rename(tmp, target)
    _fsync_dir(parent)
    if os.path.lexists(aside):
        shutil.rmtree(aside)


def _aside(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def _remove_stale_partials(target: Path) -> None:
    prefix = f".{target.name}.partial-"
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_path(path: str | os.PathLike, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):  # POSIX; Windows cannot open (or fsync) a directory
        _fsync_path(path, os.O_RDONLY | os.O_DIRECTORY)


_renameat2_fn: Callable[..., int] | None | bool = False


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange paths ``a`` and ``b`` (Linux renameat2); False where unsupported."""
    global _renameat2_fn
    if _renameat2_fn is False:
        try:
            _renameat2_fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            _renameat2_fn = None
    if _renameat2_fn is None:
        return False
    if _renameat2_fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))
