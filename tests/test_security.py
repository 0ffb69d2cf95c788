"""Untrusted files: no pickle runs, configs cannot execute code, paths stay inside the run."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest

from lmtrain.checkpoint import resolve_checkpoint
from lmtrain.config import load_config
from lmtrain.errors import CheckpointError, ConfigError, ShardError
from lmtrain.sample import SampleOptions, sample
from lmtrain.shards import open_split, verify_shards
from lmtrain.train import train

MARKER = "/tmp/lmtrain-security-marker"


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


@pytest.fixture
def trained(tiny_run):
    config, run_dir = tiny_run
    train(load_config(config, ["train.max_steps=3"]))
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    return config, run_dir, run_dir / "checkpoints" / "step-00000003"


@pytest.mark.slow
def test_pickled_weights_are_refused_without_running(trained):
    config, run_dir, ckpt = trained
    with open(ckpt / "model.safetensors", "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        sample(run_dir, SampleOptions(max_new_tokens=2))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        train(load_config(config, ["train.max_steps=6"]))
    assert not os.path.exists(MARKER)


@pytest.mark.slow
def test_pickled_optimizer_state_is_refused_without_running(trained):
    config, _, ckpt = trained
    with open(ckpt / "optimizer.pt", "wb") as f:
        pickle.dump({"optimizer": Payload(), "scaler": {}}, f)
    with pytest.raises(CheckpointError, match="refused or is corrupt"):
        train(load_config(config, ["train.max_steps=6"]))
    assert not os.path.exists(MARKER)


def test_yaml_python_tags_are_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"run:\n  name: !!python/object/apply:os.system ['touch {MARKER}']\n")
    with pytest.raises(ConfigError, match="not allowed"):
        load_config(path)
    assert not os.path.exists(MARKER)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["../../outside", "/etc", "step-00000003/../../x", "step-1"])
def test_pointers_cannot_leave_the_checkpoints_directory(trained, target):
    _, run_dir, _ = trained
    (run_dir / "checkpoints" / "latest").write_text(target + "\n")
    with pytest.raises(CheckpointError, match="refusing"):
        resolve_checkpoint(run_dir / "checkpoints", "latest")


@pytest.mark.slow
def test_symlinked_checkpoint_is_refused(trained, tmp_path):
    _, run_dir, ckpt = trained
    outside = tmp_path / "elsewhere"
    shutil.copytree(ckpt, outside)
    link = run_dir / "checkpoints" / "step-00000099"
    link.symlink_to(outside, target_is_directory=True)
    (run_dir / "checkpoints" / "best").write_text("step-00000099\n")
    with pytest.raises(CheckpointError, match="points outside"):
        resolve_checkpoint(run_dir / "checkpoints", "best")


@pytest.mark.slow
def test_symlinked_shard_is_refused(trained, tmp_path):
    _, run_dir, _ = trained
    data = run_dir / "data"
    real = tmp_path / "real.bin"
    shutil.move(data / "val-00000.bin", real)
    (data / "val-00000.bin").symlink_to(real)
    with pytest.raises(ShardError, match="symbolic link"):
        open_split(data, "val")
    with pytest.raises(ShardError, match="symbolic link"):
        verify_shards(data)
