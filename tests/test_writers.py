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

from conftest import REPO, TINY_TRAIN, make_text_corpus, run_cli, tiny_config, wait_for_line, write_config
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


# -- Reliability III: nothing a user owns is ever deleted ----------------------------------------


def _dead_pid() -> int:
    """The PID of a process that has exited (a leftover's owner)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported_run(prepared_run, tmp_path_factory):
    """A trained tiny run (llama-shaped, so every format exports) and where its exports may go."""
    source_run, corpus = prepared_run
    root = tmp_path_factory.mktemp("export")
    run_dir = copy_prepared(source_run, root / "run")
    config = tiny_config(root / "config.yaml", run_dir, corpus)
    train(load_config(config, ["train.max_steps=2", "model.pos_embedding=rope", "model.norm=rmsnorm",
                               "model.mlp=swiglu"]))
    return run_dir


@pytest.mark.slow
def test_export_force_replaces_only_an_earlier_export(exported_run, tmp_path):
    from lmtrain.export import ExportError, export

    run = exported_run
    before = _tree(run)
    user = tmp_path / "folder"
    user.mkdir()
    (user / "thesis.tex").write_text("three years of work")
    refusals = {
        "is a run directory": (run, "hf"),
        "inside the run's own checkpoints": (run / "checkpoints", "hf"),
        "inside the run's own checkpoints ": (run / "checkpoints" / "latest", "gguf"),
        "inside the run's own data": (run / "data" / "new-export", "hf"),
        "has no readable lmtrain-export.json": (user, "hf"),
        "is a directory, and --format gguf writes a file": (user, "gguf"),
    }
    for expected, (out, fmt) in refusals.items():
        with pytest.raises(ExportError, match=expected.strip()):
            export(run, fmt, out, force=True)
    assert (user / "thesis.tex").read_text() == "three years of work"
    assert _tree(run) == before  # the run, its checkpoints and pointers untouched
    # An earlier export is replaced; once another file is put into it, it is the user's folder.
    out = tmp_path / "hf"
    export(run, "hf", out)
    export(run, "hf", out, force=True)
    assert json.loads((out / "lmtrain-export.json").read_text())["format"] == "hf"
    (out / "notes.md").write_text("mine")
    with pytest.raises(ExportError, match=r"holds files an export does not write \(notes.md\)"):
        export(run, "hf", out, force=True)
    assert (out / "notes.md").read_text() == "mine"
    # GGUF: a file lmtrain wrote is replaced; any other file is not.
    gguf = tmp_path / "m.gguf"
    export(run, "gguf", gguf)
    export(run, "gguf", gguf, force=True, quant="q8_0")
    theirs = tmp_path / "theirs.gguf"
    theirs.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(ExportError, match="is not a GGUF file lmtrain wrote"):
        export(run, "gguf", theirs, force=True)
    assert theirs.read_bytes() == b"GGUF" + b"\0" * 60
    # A link is never written through.
    link = tmp_path / "link"
    link.symlink_to(user)
    with pytest.raises(ExportError, match="is a symbolic link"):
        export(run, "hf", link, force=True)


@pytest.mark.slow
def test_export_cleans_only_its_own_dead_leftovers(exported_run, tmp_path):
    from lmtrain.export import export
    from lmtrain.fsutil import STAGING_MARK

    out = tmp_path / "model"
    mine_dir, mine_file = tmp_path / "model.tmp-my-notes", tmp_path / "model.tmp-final"
    mine_dir.mkdir()
    (mine_dir / "n.txt").write_text("keep")
    mine_file.write_text("keep")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f"model.tmp-{sleeper.pid}"  # a concurrent export at work
        live.mkdir()
        (live / STAGING_MARK).write_text(str(sleeper.pid))
        dead = _dead_pid()
        crashed = tmp_path / f"model.tmp-{dead}"  # a killed export's staging: lmtrain's mark inside
        crashed.mkdir()
        (crashed / STAGING_MARK).write_text(str(dead))
        unmarked = tmp_path / f"model.tmp-{_dead_pid()}"  # the same form, but nothing proves it lmtrain's
        unmarked.mkdir()
        (unmarked / "data.bin").write_text("keep")
        export(exported_run, "hf", out)
        assert not crashed.exists()
        assert live.is_dir() and (mine_dir / "n.txt").read_text() == "keep" and mine_file.read_text() == "keep"
        assert (unmarked / "data.bin").read_text() == "keep"
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
def test_a_killed_force_export_keeps_the_earlier_one(exported_run, tmp_path):
    """Killed after the earlier export was moved aside and before the new one took its place: the
    next export puts the earlier one back rather than deleting it."""
    from lmtrain.export import ExportError, export
    from lmtrain.fsutil import STAGING_MARK

    out = tmp_path / "model"
    export(exported_run, "hf", out)
    earlier = _tree(out)
    aside = tmp_path / f"model.tmp-{_dead_pid()}.old"
    out.rename(aside)
    (aside / STAGING_MARK).write_text("gone")
    with pytest.raises(ExportError, match="already exists"):  # restored, so without --force: refused
        export(exported_run, "hf", out)
    assert _tree(out) == earlier and not aside.exists()


@pytest.mark.slow
def test_export_reads_the_checkpoint_once_while_the_trainer_prunes(exported_run, tmp_path, monkeypatch):
    """The model card used to re-read state.json after the weights: a checkpoint pruned in between
    failed the export 1 time in 5. Now everything comes from the one load."""
    import shutil

    import lmtrain.export as export_module
    from lmtrain.inference import load_model

    run = tmp_path / "run"
    shutil.copytree(exported_run, run)

    def load_then_prune(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        shutil.rmtree(loaded.checkpoint)  # the trainer's pruning, right after the export read it
        return loaded

    monkeypatch.setattr(export_module, "load_model", load_then_prune)
    result = export_module.export(run, "hf", tmp_path / "out")
    assert (tmp_path / "out" / "README.md").read_text().count("steps") >= 1 and result.step == 2


@pytest.mark.slow
def test_a_stage_cleans_only_provable_leftovers_in_the_run(tiny_run):
    """Tokenize, shard and checkpoint staging: a leftover of a dead lmtrain process (its PID, its
    mark) goes; a live one's, or one nothing proves lmtrain's, stays."""
    from lmtrain.fsutil import STAGING_MARK

    config, run_dir = tiny_run
    dead = _dead_pid()
    ours = run_dir / "checkpoints" / f"step-00000005.tmp-{dead}"
    ours.mkdir(parents=True)
    (ours / STAGING_MARK).write_text(str(dead))
    not_ours = run_dir / "checkpoints" / f"step-00000006.tmp-{dead}"
    not_ours.mkdir()
    shard_staging = run_dir / f"data.tmp-{dead}"
    shard_staging.mkdir()
    (shard_staging / STAGING_MARK).write_text(str(dead))
    train(load_config(config, ["train.max_steps=2", "train.checkpoint_every=1"]))
    assert not ours.exists() and not_ours.is_dir()
    from lmtrain.prepare import build_shards

    build_shards(load_config(config, ["shard.shard_tokens=4096"]))
    assert not shard_staging.exists()


@pytest.mark.slow
def test_a_distilled_run_refuses_to_resume_on_another_teacher(tiny_run, tmp_path):
    from lmtrain.errors import CheckpointError

    config, run_dir = tiny_run
    teacher = copy_prepared(run_dir, tmp_path / "teacher")
    train(load_config(config, [f"run.dir={teacher}", "train.max_steps=3"]))
    sets = [f"train.distill_from={teacher}", "train.max_steps=4", "train.checkpoint_every=2"]
    train(load_config(config, sets))
    train(load_config(config, [f"run.dir={teacher}", "train.max_steps=6"]))  # the teacher trains on
    with pytest.raises(CheckpointError, match="it was distilled from .* and the config now gives"):
        train(load_config(config, sets[:1] + ["train.max_steps=8"]))


@pytest.mark.slow
def test_a_relative_source_with_dotdot_is_read_from_inside_a_run_directory(tmp_path, monkeypatch):
    corpus = make_text_corpus(tmp_path / "corpus", n_docs=30)
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", run_dir, corpus)
    assert run_cli("tokenize", "--config", str(config)).returncode == 0
    monkeypatch.chdir(run_dir)
    from lmtrain.corpus import resolve_local_files

    found = resolve_local_files("../corpus")
    assert len(found) == 30  # not skipped as "inside" the run directory the process stands in


@pytest.mark.slow
def test_a_lora_run_finds_its_base_after_the_project_folder_moves(prepared_run, tmp_path):
    import shutil

    from lmtrain.inference import load_model

    source_run, corpus = prepared_run
    project = tmp_path / "project"
    base = copy_prepared(source_run, project / "base")
    config = tiny_config(project / "config.yaml", base, corpus)
    train(load_config(config, ["train.max_steps=2"]))
    lora = copy_prepared(source_run, project / "lora")
    train(load_config(config, [f"run.dir={lora}", f"model.init_from={base}", "train.lora_rank=2",
                               "train.optimizer=adamw", "train.max_steps=2"]))
    before = load_model(lora).model.state_dict()
    moved = shutil.move(str(project), str(tmp_path / "moved"))
    after = load_model(Path(moved) / "lora").model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_sources_files_are_size_checked_before_they_are_loaded(tmp_path, monkeypatch):
    """A 453 MB tokenizer.json of 10 M merges took 15 GB and 107 s to load: sizes are checked first."""
    import lmtrain.pretrained as pretrained
    from lmtrain.errors import ConfigError
    from lmtrain.fsutil import read_json

    (tmp_path / "big.json").write_text(json.dumps({"merges": ["a b"] * 1000}))
    with pytest.raises(ValueError, match="bytes, more than the 1,000 lmtrain reads"):
        read_json(tmp_path / "big.json", limit=1000)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 2, "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "eos_token_id": 0}))
    (src / "model.safetensors").write_bytes(b"x")
    (src / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "merges": ["a b"] * 1000}}))
    monkeypatch.setattr(pretrained, "TOKENIZER_LIMIT", 1000)
    with pytest.raises(ConfigError, match="tokenizer.json is not readable JSON .* more than the 1,000"):
        pretrained.open_source(str(src))
