"""Atomic file writes: a crash or a full disk never leaves a half-written file under the final name.

- :func:`atomic_writer` / :func:`atomic_write_text` / :func:`atomic_write_bytes`: one file, written to a temporary
  file beside it (``.NAME.XXXX.tmp``), fsynced and renamed over the final name.
- :func:`staged_folder`: a folder of files (a checkpoint, a model), written into a temporary folder beside it
  (``.NAME.XXXX.staging``) and renamed into place once complete.

An ``OSError`` on the way becomes an :class:`OutputError` whose one-line message names the final path; a full disk
(``ENOSPC``, or ``EDQUOT`` for a quota) says so. The temporary file or folder is removed, and whatever was under the
final name before is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import OutputError

__all__ = ["atomic_writer", "atomic_write_text", "atomic_write_bytes", "staged_folder", "disk_full", "output_error"]

_FULL = {errno.ENOSPC: "no space left on the device (the disk is full)", errno.EDQUOT: "the disk quota is exceeded"}


def _full_errno(exc: BaseException | None) -> int | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from or while handling, is a full disk (or quota)."""
    return _full_errno(exc) is not None


def output_error(path: str | os.PathLike, exc: BaseException) -> OutputError:
    """The one-line :class:`OutputError` for a failed write of ``path``."""
    full = _full_errno(exc)
    if full is not None:
        return OutputError(f"cannot write {path}: {_FULL[full]}; free some space and rerun")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    reason = " ".join(reason.split())  # one line
    return OutputError(f"cannot write {path}: {reason}; check the folder's permissions and free space")


def _umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    """An existing file's own permissions, else 0666 less the umask (mkstemp's 0600 would make a result or a bundle
    unreadable to the other users of a shared machine)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _fsync_folder(folder: Path) -> None:
    """Make renames in ``folder`` durable (best effort: not every file system lets a folder be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _existing_folder(path: Path) -> Path:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: folder {folder} does not exist; create it first")
    return folder


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was; an ``OSError`` (a full disk, a
    read-only folder) becomes an :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    folder = _existing_folder(path)
    binary = "b" in mode
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise output_error(path, exc) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding, newline=None if binary else "") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) or (isinstance(exc, Exception) and disk_full(exc)):
            raise output_error(path, exc) from None
        raise
    _fsync_folder(folder)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_writer(path, "w") as handle:
        handle.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_writer(path, "wb") as handle:
        handle.write(data)


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path`` to fill; on success fsync it and rename it to ``path``.

    An existing ``path`` is replaced only once the new folder is complete: it is moved aside, the new folder is
    renamed in, then the old one is deleted (a crash between the two renames leaves nothing under ``path``, never a
    partial folder). On any exception the temporary folder is removed and ``path`` is left as it was. A full disk,
    wherever it is met, and a failure of the final fsync and renames become an :class:`OutputError` naming ``path``;
    other exceptions of the caller's block pass through unchanged.
    """
    path = Path(path)
    parent = _existing_folder(path)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".staging", dir=parent))
    except OSError as exc:
        raise output_error(path, exc) from None
    aside = None
    try:
        try:
            yield staging
        except Exception as exc:
            if disk_full(exc):
                raise output_error(path, exc) from None
            raise
        try:
            for item in sorted(staging.rglob("*"), reverse=True):  # a folder's files before the folder
                if item.is_symlink():
                    continue
                if item.is_file():
                    with item.open("rb") as handle:
                        os.fsync(handle.fileno())
                else:
                    _fsync_folder(item)
            _fsync_folder(staging)
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the folder from other users
            if path.exists() or path.is_symlink():
                aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
                os.replace(path, aside / path.name)
            os.replace(staging, path)
        except OSError as exc:
            raise output_error(path, exc) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if aside is not None and not path.exists() and (aside / path.name).exists():
            os.replace(aside / path.name, path)  # put the previous folder back
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_folder(parent)
