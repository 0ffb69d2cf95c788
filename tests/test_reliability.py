"""Crash safety: SIGKILL at random moments loses nothing; failed writes leave the previous
artifact intact and in use."""

from __future__ import annotations

import errno
import importlib.util
import json
import random

import pytest

from conftest import REPO
from lmtrain import checkpoint as ckpt_module
from lmtrain import prepare as prepare_module
from lmtrain import shards as shards_module
from lmtrain.config import load_config
from lmtrain.errors import CheckpointError, ShardError
from lmtrain.train import train


def load_chaos():
    spec = importlib.util.spec_from_file_location("chaos_train", REPO / "scripts" / "chaos_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_chaos_train_kills_lose_nothing(tmp_path):
    report = load_chaos().chaos_train(tmp_path, kills=3, rng=random.Random(1), max_steps=60)
    assert report["problems"] == []
    assert report["kills"] >= 2 and report["identical"]
    assert report["second_writers_refused"] >= 1


@pytest.mark.slow
def test_chaos_shard_kills_leave_no_half_written_set(tmp_path):
    report = load_chaos().chaos_shard(tmp_path, kills=2, rng=random.Random(2), documents=120)
    assert report["problems"] == [] and report["identical"]


@pytest.mark.slow
def test_chaos_export_kills_keep_the_export_whole_and_the_users_files(tmp_path):
    report = load_chaos().chaos_export(tmp_path, kills=3, rng=random.Random(3))
    assert report["problems"] == [] and report["kills"] == 3


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.slow
def test_checkpoint_write_failure_keeps_the_previous_one(tiny_run, monkeypatch):
    config, run_dir = tiny_run
    train(load_config(config, ["train.max_steps=10"]))
    real_save = ckpt_module.torch.save

    def half_then_full(obj, path, *a, **kw):
        with open(path, "wb") as f:
            f.write(b"\x80\x02partial")  # the disk fills up midway through the file
        disk_full()

    monkeypatch.setattr(ckpt_module.torch, "save", half_then_full)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-00000020: No space left "
                                              r"on device \(the disk is full\); the previous checkpoint "
                                              r"\(step-00000010\) is intact"):
        train(load_config(config, ["train.max_steps=20"]))
    monkeypatch.setattr(ckpt_module.torch, "save", real_save)
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000010"
    assert not [p for p in ckpts.iterdir() if ".tmp-" in p.name or p.name == "step-00000020"]
    resumed = train(load_config(config, ["train.max_steps=20"]))
    assert resumed.resumed_from == "step-00000010" and resumed.step == 20


def _reshard(config, monkeypatch, target, attribute, replacement):
    cfg = load_config(config, ["shard.shard_tokens=4096"])
    monkeypatch.setattr(target, attribute, replacement)
    with pytest.raises(ShardError, match=r"could not write shards .*No space left on device \(the disk is "
                                         r"full\); the previous shards in .* are untouched"):
        prepare_module.build_shards(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["shard", "manifest"])
def test_shard_or_manifest_write_failure_keeps_the_previous_shards(tiny_run, monkeypatch, what):
    config, run_dir = tiny_run
    data = run_dir / "data"
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    if what == "shard":
        real_finish = shards_module.ShardWriter._finish
        calls = {"n": 0}

        def finish_then_fail(self):
            calls["n"] += 1
            if calls["n"] == 2:
                self._file.write(b"\0" * 100)
                disk_full()
            return real_finish(self)

        _reshard(config, monkeypatch, shards_module.ShardWriter, "_finish", finish_then_fail)
    else:
        _reshard(config, monkeypatch, prepare_module, "atomic_write_json", disk_full)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]
    assert shards_module.verify_shards(data).shards == len(json.loads((data / "manifest.json").read_text())["shards"])
    monkeypatch.undo()
    result = train(load_config(config, ["train.max_steps=3"]))  # and training still uses them
    assert result.step == 3
