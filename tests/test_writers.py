"""Reliability II: one writer per run directory, artifacts that agree with the config, recovery
instead of restart, and faults (a full disk) that stay one line with the previous artifact intact."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_TRAIN, make_text_corpus, run_cli, wait_for_line, write_config
from lmtrain.config import load_config
from lmtrain.rundir import fork_run
from lmtrain.train import train


def weights(run_dir: Path) -> dict:
    name = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / name / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def copy_prepared(source_run: Path, target: Path) -> Path:
    fork_run(source_run, target)
    return target


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# -- one writer at a time ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_writer_is_refused_and_the_first_finishes_undisturbed(tiny_run, tmp_path):
    config, run_dir = tiny_run
    steps = ["--set", "train.max_steps=40", "--set", "train.checkpoint_every=20"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "lmtrain", "train", "--config", str(config), *steps],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(run_dir / "train.log", "step 3:")
    # Paused mid-run, the first trainer still holds the lock: every other writer meets it.
    first.send_signal(signal.SIGSTOP)
    try:
        others = [["train", "--config", str(config), *steps],
                  ["train", "--config", str(config), "--restart", *steps],
                  ["shard", "--config", str(config), "--force"],
                  ["tokenize", "--config", str(config), "--force"]]
        refusals = [run_cli(*args) for args in others]
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    for result in refusals:
        line = one_error_line(result)
        assert f"is in use by `lmtrain train` (pid {first.pid}" in line, line
    assert not list(run_dir.glob("*.old-*")) and not (run_dir / ".lmtrain-writer").exists()
    # The first run's result is exactly an undisturbed run's.
    alone = copy_prepared(run_dir, tmp_path / "alone")
    undisturbed = run_cli("train", "--config", str(config), *steps, "--set", f"run.dir={alone}",
                          env={"OMP_NUM_THREADS": "1"})
    assert undisturbed.returncode == 0, undisturbed.stderr
    assert_same_weights(weights(run_dir), weights(alone))


@pytest.mark.slow
def test_readers_take_no_lock_and_a_failed_first_command_leaves_no_directory(tiny_run, tmp_path):
    from lmtrain.rundir import hold_run_dir
    from lmtrain.sample import SampleOptions, sample

    config, run_dir = tiny_run
    train(load_config(config, ["train.max_steps=5"]))
    with hold_run_dir(run_dir, "train"):
        assert json.loads((run_dir / ".lmtrain-writer").read_text())["pid"] == os.getpid()
        stats = sample(run_dir, SampleOptions(max_new_tokens=3))  # a reader, while a writer holds it
        assert stats.tokens >= 1
    assert not (run_dir / ".lmtrain-writer").exists()
    fresh = tmp_path / "fresh-run"
    result = run_cli("train", "--config", str(config), "--set", f"run.dir={fresh}")
    assert "run `lmtrain tokenize`" in one_error_line(result)
    assert not fresh.exists()


# -- artifacts agree, or the command refuses ---------------------------------------------------


@pytest.mark.slow
def test_tokenize_force_moves_everything_made_with_the_old_tokenizer_aside(tiny_run):
    config, run_dir = tiny_run
    train(load_config(config, ["train.max_steps=5"]))
    old_sha = json.loads((run_dir / "tokenizer" / "stats.json").read_text())["sha256"]
    result = run_cli("tokenize", "--config", str(config), "--force", "--set", "tokenizer.vocab_size=280")
    assert result.returncode == 0, result.stderr
    for part in ("tokenizer", "data", "checkpoints", "tb"):
        aside = list(run_dir.glob(f"{part}.old-*"))
        assert len(aside) == 1, part
        assert f"moved aside: {aside[0]}" in result.stdout
    assert json.loads((next(run_dir.glob("tokenizer.old-*")) / "stats.json").read_text())["sha256"] == old_sha
    assert not (run_dir / "data").exists() and not (run_dir / "checkpoints").exists()
    assert json.loads((run_dir / "tokenizer" / "stats.json").read_text())["vocab_size"] == 280


@pytest.mark.slow
def test_a_run_directory_inside_the_corpus_is_not_read_as_corpus(tmp_path):
    corpus = make_text_corpus(tmp_path / "project" / "texts", n_docs=40)
    project = corpus.parent
    config = write_config(tmp_path / "c.yaml", project / "runs" / "r", project, **TINY_TRAIN)
    first = run_cli("tokenize", "--config", str(config))
    assert first.returncode == 0, first.stderr
    stats = json.loads((project / "runs" / "r" / "tokenizer" / "stats.json").read_text())
    again = run_cli("tokenize", "--config", str(config), "--force", "--set", "run.dir=" + str(project / "runs" / "r2"))
    assert again.returncode == 0, again.stderr
    # The second run sees the same documents: not the first run's stats.json, config or log.
    assert json.loads((project / "runs" / "r2" / "tokenizer" / "stats.json").read_text())["documents"] == stats["documents"]


# -- recover, do not restart -------------------------------------------------------------------


@pytest.mark.slow
def test_a_deleted_latest_resumes_from_the_newest_complete_checkpoint(tiny_run, tmp_path):
    config, run_dir = tiny_run
    constant = ["train.schedule=constant"]  # so that a 20-step run is the first 20 steps of a 30-step one
    straight = copy_prepared(run_dir, tmp_path / "straight")
    train(load_config(config, constant + [f"run.dir={straight}", "train.max_steps=30"]))
    train(load_config(config, constant + ["train.max_steps=20"]))
    (run_dir / "checkpoints" / "latest").unlink()
    (run_dir / "checkpoints" / "step-00000020" / "model.safetensors").unlink()  # the newest is incomplete
    result = run_cli("train", "--config", str(config), "--set", "train.max_steps=30", "--set", constant[0])
    assert result.returncode == 0, result.stderr
    assert "resuming from the newest complete checkpoint, step-00000010" in result.stderr
    assert "resuming from step-00000010 at step 10" in result.stderr
    assert_same_weights(weights(run_dir), weights(straight))


# -- faults stay one line ------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str = "6m"):
    """A tmpfs of ``size`` at ``path`` (root only; the test is skipped elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill the disk but ``leave`` bytes; return the filler to delete."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 16, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_previous_artifacts_stay_usable(prepared_run, tmp_path):
    source_run, corpus = prepared_run
    with small_disk(tmp_path / "disk") as disk:
        run_dir = copy_prepared(source_run, disk / "run")
        config = write_config(tmp_path / "c.yaml", run_dir, corpus, **TINY_TRAIN)
        raw = __import__("yaml").safe_load(config.read_text())
        raw["data"]["val_fraction"], raw["shard"] = 0.15, {"shard_tokens": 8192}
        config.write_text(__import__("yaml").safe_dump(raw))
        first = run_cli("train", "--config", str(config), "--set", "train.max_steps=10")
        assert first.returncode == 0, first.stderr
        tokenizer_sha = json.loads((run_dir / "tokenizer" / "stats.json").read_text())["sha256"]
        # Room for the small files (config, log, lock note), not for the artifact itself.
        checks = {
            "train": (["train", "--config", str(config), "--set", "train.max_steps=20"], 96 << 10,
                      "could not write checkpoint", "the previous checkpoint (step-00000010) is intact"),
            "shard": (["shard", "--config", str(config), "--force"], 16 << 10, "could not write shards",
                      "the previous shards"),
            "tokenize": (["tokenize", "--config", str(config), "--force"], 8 << 10, "could not write",
                         "the previous tokenizer (if any) is untouched"),
            "first write": (["train", "--config", str(config), "--set", "train.max_steps=20"], 0,
                            "No space left on device", "cannot write"),
        }
        for name, (args, room, what, intact) in checks.items():
            filler = fill(disk, leave=room)
            line = one_error_line(run_cli(*args))
            assert what in line and intact in line, (name, line)
            assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name], name  # no staging left behind
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000010"
        assert json.loads((run_dir / "tokenizer" / "stats.json").read_text())["sha256"] == tokenizer_sha
        assert not list(run_dir.glob("*.old-*"))  # a failed tokenize moved nothing aside
        filler.unlink()
        resumed = run_cli("train", "--config", str(config), "--set", "train.max_steps=20")
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming from step-00000010" in resumed.stderr
        verified = run_cli("shard", "--config", str(config), "--verify")
        assert verified.returncode == 0, verified.stderr


# -- the smaller things ------------------------------------------------------------------------


@pytest.mark.slow
def test_artifacts_follow_the_umask_and_a_corrupt_training_shard_is_one_line(tiny_run):
    config, run_dir = tiny_run
    train(load_config(config, ["train.max_steps=5"]))
    model = next((run_dir / "checkpoints").glob("step-*/model.safetensors"))
    assert stat.S_IMODE(model.stat().st_mode) == 0o666 & ~_umask()
    shard = run_dir / "data" / "train-00000.bin"
    blob = bytearray(shard.read_bytes())
    for offset in range(256, len(blob), 20):  # an out-of-vocabulary id every ten tokens
        blob[offset:offset + 2] = (65000).to_bytes(2, "little")
    shard.write_bytes(bytes(blob))
    line = one_error_line(run_cli("train", "--config", str(config), "--set", "train.max_steps=8"))
    assert "train-00000.bin: token id 65000 is outside the vocabulary of 300" in line


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_schedule_surprises_are_said(tiny_run):
    config, run_dir = tiny_run
    short = run_cli("train", "--config", str(config), "--set", "train.max_steps=4",
                    "--set", "train.warmup_steps=10")
    assert short.returncode == 0, short.stderr
    assert "train.warmup_steps (10) is longer than the run (train.max_steps 4)" in short.stderr
    longer = run_cli("train", "--config", str(config), "--set", "train.max_steps=8")
    assert longer.returncode == 0, longer.stderr
    assert "the learning-rate schedule changed on resume" in longer.stderr
    assert "train.max_steps 4 -> 8" in longer.stderr


@pytest.mark.slow
def test_a_best_that_names_a_lost_checkpoint_is_repointed(tiny_run):
    config, run_dir = tiny_run
    train(load_config(config, ["train.max_steps=20"]))
    (run_dir / "checkpoints" / "best").write_text("step-00000007\n")  # never existed
    result = run_cli("train", "--config", str(config), "--set", "train.max_steps=21",
                     "--set", "train.checkpoint_every=100")
    assert result.returncode == 0, result.stderr
    assert "names step-00000007, which is gone or incomplete: it now names step-000000" in result.stderr
    assert (run_dir / "checkpoints" / "best").read_text().strip() in {"step-00000010", "step-00000020", "step-00000021"}
