"""The run directory: one folder per run that holds every artifact.

    RUN_DIR/config.yaml        the resolved config (defaults filled in, overrides applied)
    RUN_DIR/tokenizer/         tokenizer.json, stats.json           (lmtrain tokenize)
    RUN_DIR/data/              train-*.bin, val-*.bin, manifest.json (lmtrain shard)
    RUN_DIR/checkpoints/       step-XXXXXXXX/, latest, best         (lmtrain train)
    RUN_DIR/tb/                TensorBoard event files              (lmtrain train)
    RUN_DIR/train.log          the training log                     (lmtrain train)

One writer at a time: every command that writes into a run directory holds ``hold_run_dir`` for
its whole life, an exclusive ``flock`` on the directory itself, taken before any check or write.
The OS drops it when the process dies (even by SIGKILL), so a lock is never stale. While it is
held, ``RUN_DIR/.lmtrain-writer`` names the command and PID, for the message a second writer gets.
Readers (sample, eval) take no lock: they only ever read complete, renamed-into-place artifacts.

Every stage calls ``prepare_run_dir`` once its checks pass and before it writes an artifact, so an
unusable directory (a file in its place, no write permission) is reported up front, and the
config that produced the artifacts is always next to them. It also leaves the marker
``RUN_DIR/.lmtrain-run``, by which a directory corpus source recognises (and skips) run directories.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

from lmtrain.config import Config, resolved_config_path
from lmtrain.errors import RunDirError
from lmtrain.fsutil import TMP_MARKER, atomic_write_text, describe_os_error, read_json


def tokenizer_dir(run_dir: Path) -> Path:
    return run_dir / "tokenizer"


def tokenizer_path(run_dir: Path) -> Path:
    return tokenizer_dir(run_dir) / "tokenizer.json"


def data_dir(run_dir: Path) -> Path:
    return run_dir / "data"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tb_dir(run_dir: Path) -> Path:
    return run_dir / "tb"


RUN_MARKER = ".lmtrain-run"  # every run directory holds it (written by prepare_run_dir)
WRITER_FILE = ".lmtrain-writer"  # who holds the lock, while it is held
# What a run directory holds of its own: nothing else may be written over or into these.
RUN_ARTIFACTS = ("checkpoints", "tokenizer", "data", "tb", "config.yaml", "train.log", RUN_MARKER, WRITER_FILE)


def fork_run(source: Path, target: Path) -> Path:
    """A new run directory ``target`` on ``source``'s prepared tokenizer and shards (copied, so each
    run owns its files): another model or schedule on the same data, without tokenizing again."""
    for part in (tokenizer_dir(source), data_dir(source)):
        shutil.copytree(part, Path(target) / part.name)
    return Path(target)


def is_run_dir(directory: Path) -> bool:
    """Whether ``directory`` is an lmtrain run directory (also one made before the marker existed,
    or one whose first writer is still at work)."""
    return ((directory / RUN_MARKER).exists() or (directory / WRITER_FILE).exists()
            or ((directory / "config.yaml").is_file() and (directory / "tokenizer" / "tokenizer.json").is_file()))


# --------------------------------------------------------------------------------------------
# One writer at a time
# --------------------------------------------------------------------------------------------

_held: dict[str, list] = {}  # resolved run dir -> [fd, depth]: one process may nest its stages


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, command: str) -> Iterator[None]:
    """Hold the run directory's writer lock for the ``with`` block, or raise ``RunDirError``
    naming the command and PID that hold it. Re-entrant within one process (``lmtrain run``
    calls the stages, each of which takes it)."""
    check_run_dir_usable(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create run.dir {run_dir}: {describe_os_error(exc)}") from None
    key = str(run_dir.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd = _lock(run_dir)
    _held[key] = [fd, 1]
    writer = run_dir / WRITER_FILE
    try:
        with contextlib.suppress(OSError):  # informational only: the lock is the flock
            atomic_write_text(writer, json.dumps({"command": command, "pid": os.getpid(),
                                                  "host": socket.gethostname(),
                                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            writer.unlink()
        if created:  # a command that wrote nothing leaves nothing behind
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        os.close(fd)


def _lock(run_dir: Path) -> int:
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirError(f"{run_dir} is in use by {_holder(run_dir)}: one command writes to a run "
                              "directory at a time; wait for it to finish or stop it") from None
        raise RunDirError(f"cannot lock {run_dir} ({describe_os_error(exc)}): the filesystem does not "
                          "support flock; use a run.dir on a local disk") from None
    return fd


def _holder(run_dir: Path) -> str:
    try:
        info = read_json(run_dir / WRITER_FILE, 4096)
        where = f" on {info['host']}" if info.get("host") != socket.gethostname() else ""
        return f"`lmtrain {info['command']}` (pid {info['pid']}{where}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another lmtrain command"


def move_aside(path: Path) -> Path | None:
    """Rename a file or directory to ``NAME.old-<timestamp>``; nothing is deleted."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.old-{stamp}-{n}")
        n += 1
    path.rename(target)
    return target


def check_run_dir_usable(run_dir: Path) -> None:
    """Raise ``RunDirError`` if ``run_dir`` cannot hold a run; create nothing. A writer never takes
    ``/`` or the home directory, nor a folder that holds other things than a run's: whatever is
    there is the user's."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run.dir {run_dir} is a file, not a directory; choose another run.dir")
    where = Path(os.path.abspath(run_dir))
    if where == Path(where.anchor) or where == Path(os.path.abspath(Path.home())):
        raise RunDirError(f"run.dir {run_dir} is {'the root' if where == Path(where.anchor) else 'your home'} "
                          "directory; a run writes into a folder of its own (runs/<name> by default)")
    if run_dir.is_dir() and not is_run_dir(run_dir):
        foreign = sorted(p.name for p in run_dir.iterdir() if not _made_by_a_run(p.name))
        if foreign:
            raise RunDirError(f"run.dir {run_dir} holds other files ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}) and is not an lmtrain run directory; "
                              "choose a new or empty run.dir")
    if (run_dir / "train.log").is_symlink():
        raise RunDirError(f"{run_dir / 'train.log'} is a symbolic link; training appends to its log and never "
                          "writes through a link: remove it")
    # Find the nearest existing ancestor: that is where we need write permission.
    probe = run_dir
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RunDirError(f"run.dir {run_dir}: {probe} is a file, not a directory")
    if not _writable(probe):
        raise RunDirError(f"run.dir {run_dir}: {probe} is not writable; choose another run.dir")


def _made_by_a_run(name: str) -> bool:
    """Whether a name in a run directory is one of a run's own (an artifact, one moved aside, a
    staging area): a folder holding only such names is a run in the making (``fork_run``'s)."""
    base = name.split(".old-")[0].split(TMP_MARKER)[0]
    return name in RUN_ARTIFACTS or base in RUN_ARTIFACTS


def _writable(directory: Path) -> bool:
    # os.access says yes to root even on read-only mounts; actually try to create a file.
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def prepare_run_dir(config: Config) -> Path:
    """Create the run directory if needed and write the resolved config into it."""
    run_dir = config.run_dir
    check_run_dir_usable(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create run.dir {run_dir}: {exc.strerror}") from None
    try:
        atomic_write_text(resolved_config_path(run_dir), config.to_yaml())
        if not (run_dir / RUN_MARKER).exists():
            atomic_write_text(run_dir / RUN_MARKER, "an lmtrain run directory: corpus sources skip it\n")
    except OSError as exc:
        raise RunDirError(f"cannot write {resolved_config_path(run_dir)}: {describe_os_error(exc)}") from None
    return run_dir
