"""Atomic publishing of files and directories: a reader sees the old version or the new one, never half.

    atomic_write_text(path, text)            # temp file + fsync + rename
    with atomic_directory(final) as tmp:     # fill tmp; on success it replaces `final` whole
        ...
    replace_directory(tmp, final)            # publish a directory written elsewhere (checkpoints)
    append_text(path, line)                  # one whole line appended, or none (metrics.jsonl)

A write that fails (disk full, quota, file size limit, read-only filesystem) raises WriteError:
one line naming the path, the system's reason and the free space left there, and no temporary
file or torn line stays behind. Writers that do not report errno (torch's zip writer says
"unexpected pos ...") are told apart by the free space: nothing left means the disk is full.

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
import errno
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_write_text", "atomic_write_bytes", "atomic_directory", "replace_directory", "recover_directory",
           "fsync_dir", "fsync_tree", "append_text", "WriteError", "describe_write_failure", "free_space"]

FULL_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full


class WriteError(OSError):
    """A file or directory could not be written; str() is the whole message for the user."""

    def __init__(self, message: str, cause: BaseException | None = None):
        code = getattr(cause, "errno", None) or 0
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_space(path) -> tuple[int, Path] | None:
    """(bytes free to this user, mount point) of the filesystem holding `path` (or its nearest parent)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return None
    mount = path
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return free, mount


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind `error` (itself, or its cause/context chain), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error
        error = error.__cause__ or error.__context__
    return None


def describe_write_failure(path, error: BaseException | None, free: tuple[int, Path] | None = None) -> str:
    """`cannot write PATH: REASON; N free on MOUNT`; `free` measured at the failure (before any cleanup)."""
    free = free if free is not None else free_space(path)
    os_error = _os_error(error)
    if os_error is not None:
        reason = f"{os.strerror(os_error.errno)} ({errno.errorcode.get(os_error.errno, os_error.errno)})"
        inside = os_error.filename and Path(os.fsdecode(os_error.filename))
        if inside and inside != Path(path) and Path(path) in inside.parents:  # the file inside a directory
            reason += f" at {inside.relative_to(path)}"
    else:
        reason = f"{type(error).__name__}: {error}" if error is not None else "unknown error"
        if free is not None and free[0] < FULL_BYTES:
            reason = f"{os.strerror(errno.ENOSPC)} (ENOSPC; the writer said: {reason})"
    where = f"{_human(free[0])} free on {free[1]}" if free is not None else "free space unknown"
    return f"cannot write {path}: {reason}; {where}"


def is_write_failure(error: BaseException, free: tuple[int, Path] | None) -> bool:
    """Whether `error` is the filesystem refusing a write (not a bug of the code that wrote)."""
    return _os_error(error) is not None or (free is not None and free[0] < FULL_BYTES)

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _fsync_path(path) -> None:
    """fsync a file or directory by path, best effort (a no-op where it cannot be opened or synced)."""
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


def fsync_dir(path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    _fsync_path(path)


def fsync_tree(root) -> None:
    """fsync every file and directory below `root` (before the rename that publishes it)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write-then-rename with fsync: the file is either the old or the new version, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        free = free_space(path)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise WriteError(describe_write_failure(path, error, free), error) from error
    fsync_dir(path.parent)


def append_text(path, text: str) -> None:
    """Append `text` (whole lines) to `path` with O_APPEND: a failed write is cut back off, so
    the file never ends in a torn line; raises WriteError."""
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        done = 0
        try:
            while done < len(data):  # a short write (the disk filling up) is followed by the error
                done += os.write(fd, data[done:])
        except OSError as error:
            free = free_space(path)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise WriteError(describe_write_failure(path, error, free), error) from error
    finally:
        os.close(fd)


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
    except BaseException as error:
        free = free_space(tmp)  # measured before the cleanup frees the space again
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, Exception) and not isinstance(error, WriteError) and is_write_failure(error, free):
            raise WriteError(describe_write_failure(directory, error, free), error) from error
        raise
