"""Eval: bits per byte equal a hand computation; the val split default; JSON output."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from lmtrain.config import load_config
from lmtrain.evaluate import evaluate
from lmtrain.inference import load_model
from lmtrain.train import train


@pytest.fixture
def trained(tiny_run):
    config, run_dir = tiny_run
    train(load_config(config, ["train.max_steps=5"]))
    return config, run_dir


def hand_nll(loaded, ids):
    x = torch.tensor([ids[:-1]])
    y = torch.tensor([ids[1:]])
    logits, _ = loaded.model(x)
    log_probs = F.log_softmax(logits.double(), dim=-1)
    return -log_probs[0, torch.arange(len(ids) - 1), y[0]].sum().item()


@pytest.mark.slow
def test_bpb_of_a_text_equals_hand_computation(trained, tmp_path):
    _, run_dir = trained
    text = "def f(x):\n    return x + 1\n"
    (tmp_path / "t.txt").write_text(text)
    result = evaluate(run_dir, data_source=str(tmp_path / "t.txt"))
    loaded = load_model(run_dir)
    ids = loaded.tokenizer.encode(text, add_special_tokens=False).ids + [loaded.eot_id]
    assert len(ids) <= 33  # one window of block_size + 1
    nll = hand_nll(loaded, ids)
    assert result.tokens == len(ids) - 1
    assert result.bytes == len(text.encode())
    assert result.bpb == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-5)
    assert result.loss == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(result.loss), rel=1e-9)


@pytest.mark.slow
def test_long_text_scores_every_token_once(trained, tmp_path):
    _, run_dir = trained
    text = "".join(f"value_{i} = {i * 7}\n" for i in range(40))
    (tmp_path / "t.txt").write_text(text)
    result = evaluate(run_dir, data_source=str(tmp_path / "t.txt"), batch_size=3)
    loaded = load_model(run_dir)
    ids = loaded.tokenizer.encode(text, add_special_tokens=False).ids + [loaded.eot_id]
    assert len(ids) > 100
    nll = sum(hand_nll(loaded, ids[s:s + 33]) for s in range(0, len(ids) - 1, 32) if len(ids[s:s + 33]) > 1)
    assert result.tokens == len(ids) - 1
    assert result.bpb == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-5)


@pytest.mark.slow
def test_val_split_default_and_json(trained):
    _, run_dir = trained
    result = evaluate(run_dir)
    assert result.source == "val split" and result.tokens > 0
    assert result.unigram_bpb is not None and result.unigram_bpb > 1
    cli = run_cli("eval", "--run", str(run_dir), "--json")
    assert cli.returncode == 0, cli.stderr
    data = json.loads(cli.stdout)
    for key in ("loss", "ppl", "bpb", "tokens", "bytes"):
        assert key in data
    assert data["bpb"] == pytest.approx(result.bpb)
    table = run_cli("eval", "--run", str(run_dir))
    assert "bits per byte" in table.stdout and "unigram byte baseline bpb" in table.stdout
