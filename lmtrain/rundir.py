"""The run directory: one folder per run that holds every artifact.

    RUN_DIR/config.yaml        the resolved config (defaults filled in, overrides applied)
    RUN_DIR/tokenizer/         tokenizer.json, stats.json           (lmtrain tokenize)
    RUN_DIR/data/              train-*.bin, val-*.bin, manifest.json (lmtrain shard)
    RUN_DIR/checkpoints/       step-XXXXXXXX/, latest, best         (lmtrain train)
    RUN_DIR/tb/                TensorBoard event files              (lmtrain train)
    RUN_DIR/train.log          the training log                     (lmtrain train)

Every stage calls ``prepare_run_dir`` before it writes anything, so an unusable directory (a
file in its place, no write permission) is reported up front, and the config that produced the
artifacts is always next to them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lmtrain.config import Config, resolved_config_path
from lmtrain.errors import RunDirError
from lmtrain.fsutil import atomic_write_text, describe_os_error


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


def check_run_dir_usable(run_dir: Path) -> None:
    """Raise ``RunDirError`` if ``run_dir`` cannot hold a run; create nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run.dir {run_dir} is a file, not a directory; choose another run.dir")
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
    except OSError as exc:
        raise RunDirError(f"cannot write {resolved_config_path(run_dir)}: {describe_os_error(exc)}") from None
    return run_dir
