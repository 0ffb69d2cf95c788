"""Crash-safe file writing.

Every artifact that matters is written under a temporary name in the same directory, flushed to
disk, and renamed into place. ``os.replace`` is atomic on POSIX, so a reader (or a resumed run)
sees either the old file or the whole new one, never half of it. A crash can leave a
``NAME.tmp-PID`` file or directory behind; those never look like finished artifacts, and the
stage that writes NAME again removes them, but only what lmtrain can prove it made
(``stale_leftovers``): the exact name with the PID of a process that is gone, and for a
directory, lmtrain's staging mark inside. A user's ``model.tmp-notes/`` or a concurrent
writer's staging area is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

TMP_MARKER = ".tmp-"
STAGING_MARK = ".lmtrain-staging"  # inside a staging directory while lmtrain fills it


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


JSON_LIMIT = 64 << 20  # bytes: lmtrain's own JSON files are kilobytes; a source's tokenizer.json megabytes


def read_json(path: str | Path, limit: int = JSON_LIMIT) -> Any:
    """A JSON file's content. ``ValueError`` (with the reason) for a file larger than ``limit``
    bytes, text that is not UTF-8 or not JSON, or JSON nested too deep to read: a crafted file is
    one line, never a memory blow-up or a traceback. ``OSError`` when it cannot be read."""
    path = Path(path)
    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"{size:,} bytes, more than the {limit:,} lmtrain reads from such a file")
    return loads(path.read_text("utf-8"))


def loads(text: str) -> Any:
    """``json.loads``, with too deep a nesting a ``ValueError`` like any other malformation."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def write_json(path: str | Path, obj: Any) -> None:
    """A JSON file inside a directory that ``atomic_dir`` renames into place as a whole."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def staging_dir(path: Path) -> Path:
    """A new, empty staging directory beside ``path`` (``tmp_name``), marked as lmtrain's own; one
    this process left earlier (it cannot be another's: the name holds our PID) is replaced."""
    tmp = tmp_name(path)
    if tmp.exists() and (tmp / STAGING_MARK).is_file():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / STAGING_MARK).write_text(f"{os.getpid()}\n")
    return tmp


def seal_staging(tmp: Path) -> None:
    """A filled staging directory, made durable and unmarked, ready to be renamed into place.

    The mark goes last, after the files' fsyncs (which take a while for large weights): a writer
    killed before it is gone leaves a marked directory that the next run may remove, and only the
    moment between the unlink and the rename leaves an unmarked one."""
    for child in tmp.iterdir():
        if child.is_file() and child.name != STAGING_MARK:
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    (tmp / STAGING_MARK).unlink(missing_ok=True)
    fsync_dir(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it is renamed to ``path``.

    ``path`` must not exist yet (directories cannot be atomically replaced). On failure the
    temporary directory is removed.
    """
    path = Path(path)
    tmp = staging_dir(path)
    try:
        yield tmp
        seal_staging(tmp)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _process_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # it exists (another user's, say)
    return False


def stale_leftovers(directory: Path, name: str | None = None, suffix: str = "") -> list[Path]:
    """What a killed lmtrain writer left in ``directory``: ``NAME.tmp-PID`` (of ``name``, or of any
    name) whose process is gone, never a link, and for a directory only one holding lmtrain's
    staging mark. ``suffix`` matches ``NAME.tmp-PID{suffix}`` instead (a moved-aside export)."""
    if not directory.is_dir():
        return []
    stem = re.escape(name) if name is not None else ".+"
    pattern = re.compile(rf"^{stem}{re.escape(TMP_MARKER)}(\d+){re.escape(suffix)}$")
    found = []
    for child in directory.iterdir():
        match = pattern.match(child.name)
        if match is None or child.is_symlink() or not _process_gone(int(match.group(1))):
            continue
        if child.is_dir() and not (child / STAGING_MARK).is_file():
            continue
        found.append(child)
    return found


def remove_stale_tmp(directory: Path, name: str | None = None) -> None:
    """Remove what killed lmtrain writers left in ``directory`` (``stale_leftovers``)."""
    for child in stale_leftovers(directory, name):
        if child.is_dir():
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
