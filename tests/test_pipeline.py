"""`lmtrain run` end to end through the real CLI, twice: the second run skips finished stages."""

from __future__ import annotations

import pytest

from conftest import REPO, TINY_TRAIN, run_cli, write_config


@pytest.mark.slow
def test_run_twice_skips_finished_stages(tmp_path, text_corpus):
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", text_corpus,
                          model=TINY_TRAIN["model"], train={**TINY_TRAIN["train"], "max_steps": 10},
                          sample={"prompt": "def ", "max_new_tokens": 20})
    first = run_cli("run", "--config", str(config))
    assert first.returncode == 0, first.stderr
    assert "[tokenize] vocab 300" in first.stderr
    assert "[shard] train" in first.stderr
    assert "[train] trained to step 10" in first.stderr
    assert first.stdout.startswith("def ")
    assert "val bpb" in first.stdout and "unigram byte baseline" in first.stdout
    assert "tensorboard --logdir" in first.stdout

    second = run_cli("run", "--config", str(config))
    assert second.returncode == 0, second.stderr
    assert "[tokenize] tokenizer present" in second.stderr and "skipped" in second.stderr
    assert "[shard] shards up to date" in second.stderr
    assert "[train] training complete at step 10; skipped" in second.stderr
    assert second.stdout.splitlines()[0] == first.stdout.splitlines()[0]  # same seed, same sample

    longer = run_cli("run", "--config", str(config), "--set", "train.max_steps=15")
    assert longer.returncode == 0, longer.stderr
    assert "[train] resumed from step-00000010 to step 15" in longer.stderr


@pytest.mark.slow
def test_run_refuses_a_stale_tokenizer(tmp_path, text_corpus):
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", text_corpus)
    assert run_cli("tokenize", "--config", str(config)).returncode == 0
    stale = run_cli("run", "--config", str(config), "--set", "tokenizer.vocab_size=320")
    assert stale.returncode == 2
    assert "trained with tokenizer.vocab_size=300, the config now says 320" in stale.stderr


@pytest.mark.slow
def test_the_data_folder_example_runs_from_the_repository_root(tmp_path):
    # data/README.md's smoke test: the example config reads data/sample.txt relative to the repo.
    result = run_cli("run", "--config", "data/example.yaml", "--set", f"run.dir={tmp_path / 'run'}",
                     "--set", "train.max_steps=10", "--set", "sample.max_new_tokens=8", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "[tokenize] vocab 512" in result.stderr and "val bpb" in result.stdout
