"""Atomic publishing of files and directories: a reader sees the old version or the new one, never half.

    atomic_write_text(path, text)            # temp file + fsync + rename
    with atomic_directory(final) as tmp:     # fill tmp; on success it replaces `final` whole
        ...
    replace_directory(tmp, final)            # publish a directory written elsewhere (checkpoints)

A directory that replaces an existing one is swapped in with one `renameat2(RENAME_EXCHANGE)`
on Linux: the old directory stays in place until the new one is, and a process killed at any
instant leaves one of the two complete. Where the exchange is unavailable the old directory is
renamed to `<name>.old` first and `recover_directory` (called before every publish and by
readers that care) puts it back if the process died between the two renames.

This module imports nothing from jetfm, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_write_text", "atomic_write_bytes", "atomic_directory", "replace_directory", "recover_directory",
           "fsync_dir", "fsync_tree"]

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def fsync_dir(path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root) -> None:
    """fsync every file and directory below `root` (before the rename that publishes it)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write-then-rename with fsync: the file is either the old or the new version, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path, text: str) -> None:
    """atomic_write_bytes for text (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "renameat2") else None


_LIBC = _libc()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2); False where that is unsupported."""
    if _LIBC is None:
        return False
    result = _LIBC.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _old(directory: Path) -> Path:
    return directory.with_name(directory.name + ".old")


def recover_directory(directory) -> None:
    """Undo a publish interrupted between its two renames (fallback path): `<name>.old` back to `name`."""
    directory = Path(directory)
    old = _old(directory)
    if old.is_dir() and not directory.exists():
        os.replace(old, directory)


def replace_directory(src, directory) -> None:
    """Publish the complete directory `src` as `directory` (same filesystem), replacing any old one.

    `src` is gone afterwards; an old `directory` is deleted once the new one is in place."""
    src, directory = Path(src), Path(directory)
    recover_directory(directory)
    if not directory.exists():
        os.replace(src, directory)
    elif _exchange(src, directory):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the old directory
    else:
        old = _old(directory)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(src, directory)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(directory.parent)


@contextlib.contextmanager
def atomic_directory(directory):
    """Yield a fresh temporary directory beside `directory` (`.<name>.*.tmp`); when the block
    succeeds its files are fsynced and it replaces `directory` whole (replace_directory); on any
    error it is deleted and `directory` stays as it was. Temporary directories of an earlier
    publish of the same name that was killed are removed first (one publisher per directory)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    for stale in directory.parent.glob(f".{directory.name}.*.tmp"):  # left by a process killed while publishing
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
