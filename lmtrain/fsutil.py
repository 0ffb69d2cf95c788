"""Crash-safe file writing.

Every artifact that matters is written under a temporary name in the same directory, flushed to
disk, and renamed into place. ``os.replace`` is atomic on POSIX, so a reader (or a resumed run)
sees either the old file or the whole new one, never half of it. A crash can leave a
``*.tmp-*`` file behind; those never look like finished artifacts and are cleaned up by the stage
that owns the directory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

TMP_MARKER = ".tmp-"


def tmp_name(path: Path) -> Path:
    """A temporary sibling of ``path``, unique per process."""
    return path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}")


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = tmp_name(path)
    try:
        yield tmp
        commit_tmp(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def commit_tmp(tmp: Path, path: Path) -> None:
    """Flush a finished temporary file to disk and rename it to ``path``, durably."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_json(path: str | Path, obj: Any) -> None:
    """A JSON file inside a directory that ``atomic_dir`` renames into place as a whole."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it is renamed to ``path``.

    ``path`` must not exist yet (directories cannot be atomically replaced). On failure the
    temporary directory is removed.
    """
    path = Path(path)
    tmp = tmp_name(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for child in tmp.iterdir():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_tmp(directory: Path) -> None:
    """Remove temporary files and directories a crashed writer left in ``directory``."""
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        if TMP_MARKER in child.name:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    child.unlink()


_UMASK: int | None = None


def default_file_mode() -> int:
    """The mode a new file gets under this process's umask (read once: reading it means setting it)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


def describe_os_error(exc: OSError) -> str:
    """A short reason for a failed write, naming the usual culprit."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        return f"{reason} (the disk is full)"
    if exc.errno == errno.EDQUOT:
        return f"{reason} (disk quota exceeded)"
    return reason


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
