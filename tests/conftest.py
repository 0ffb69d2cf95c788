"""Shared fixtures: tiny corpora written on the fly, and ways to drive the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmtrain.rundir import fork_run

REPO = Path(__file__).resolve().parent.parent

# Keep every test offline and quiet, whatever the environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compute thread per process: the suite runs on two pytest workers (README's test command), and
# each torch would otherwise start a thread per core, four busy threads on CI's two cores for
# models too small to gain from a second one. Set before torch is imported, so the CLI
# subprocesses the tests start inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def make_text_corpus(directory: Path, n_docs: int = 60, seed: int = 0) -> Path:
    """A small corpus of Python-like documents, one per .txt file, deterministic."""
    import random

    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "value", "count", "total", "index", "item", "result"]
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = []
        for _ in range(rng.randint(3, 12)):
            a, b = rng.sample(names, 2)
            lines.append(rng.choice([
                f"def {a}_{i}({b}):\n    return {b} + {rng.randint(0, 99)}\n",
                f"{a} = {b} * {rng.randint(1, 9)}\n",
                f"for {a} in range({rng.randint(2, 50)}):\n    print({a}, {b})\n",
                f"class {a.title()}{i}:\n    def __init__(self):\n        self.{b} = None\n",
            ]))
        (directory / f"doc{i:04d}.txt").write_text("".join(lines), encoding="utf-8")
    return directory


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    return make_text_corpus(tmp_path / "corpus")


def write_config(path: Path, run_dir: Path, source: Path | str, **sections: dict) -> Path:
    """A tiny config YAML: tiny vocab, and whatever sections the test adds."""
    import yaml

    config = {
        "run": {"name": "test", "dir": str(run_dir), "seed": 1},
        "data": {"source": str(source), "val_fraction": 0.1},
        "tokenizer": {"vocab_size": 300},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def wait_for_line(path: Path, text: str, timeout: float = 120, poll: float = 0.02) -> None:
    """Wait until the file at ``path`` contains ``text`` (a training log reaching a step, say)."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (path.exists() and text in path.read_text()):
        time.sleep(poll)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m lmtrain ARGS`` as a user would, capturing output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONPATH", str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "lmtrain", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, input=input,
    )


TINY_TRAIN = {
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
    "train": {"batch_size": 4, "max_steps": 20, "warmup_steps": 2, "lr": 3e-3, "min_lr": 3e-4,
              "eval_every": 5, "eval_batches": 2, "checkpoint_every": 10, "log_every": 1,
              "keep_checkpoints": 2, "checkpoint_best": False},
}


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory):
    """A run directory with a tokenizer and shards (built once), for tests that train."""
    from lmtrain.config import load_config
    from lmtrain.prepare import build_shards, train_tokenizer

    root = tmp_path_factory.mktemp("prepared")
    corpus = make_text_corpus(root / "corpus", n_docs=120)
    cfg = load_config(None, [f"run.dir={root / 'run'}", f"data.source={corpus}", "tokenizer.vocab_size=300",
                             "data.val_fraction=0.15", "shard.shard_tokens=8192"])
    train_tokenizer(cfg)
    build_shards(cfg)
    return root / "run", corpus


@pytest.fixture
def tiny_run(tmp_path, prepared_run):
    """A fresh copy of the prepared run and a config path for a tiny model; returns (config, run_dir)."""
    source_run, corpus = prepared_run
    run_dir = tmp_path / "run"
    fork_run(source_run, run_dir)
    return tiny_config(tmp_path / "config.yaml", run_dir, corpus), run_dir


def tiny_config(path: Path, run_dir: Path, corpus: Path) -> Path:
    """The config of ``prepared_run``'s data and a tiny model, for ``run_dir``, written at ``path``."""
    import yaml

    config = write_config(path, run_dir, corpus, **TINY_TRAIN)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["val_fraction"] = 0.15
    raw["shard"] = {"shard_tokens": 8192}
    config.write_text(yaml.safe_dump(raw))
    return config
