"""train.distill_from: the mixed loss, a distilled run that resumes exactly, a teacher from a
Hugging Face directory, and the refusal of a teacher with another tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import run_cli
from lmtrain.config import load_config
from lmtrain.distill import distillation_loss
from lmtrain.rundir import fork_run
from lmtrain.train import train
from test_train import interrupted_at


def test_the_loss_mixes_the_data_and_the_teacher():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    ce = F.cross_entropy(student.reshape(-1, 11), targets.reshape(-1))
    assert distillation_loss(student, teacher, targets, 0.0, 2.0) == pytest.approx(float(ce))
    assert distillation_loss(student, student, targets, 1.0, 2.0) == pytest.approx(0.0, abs=1e-6)
    kl = F.kl_div(F.log_softmax(student / 2, -1), F.softmax(teacher / 2, -1), reduction="sum") / 10
    assert distillation_loss(student, teacher, targets, 0.25, 2.0) == pytest.approx(float(0.75 * ce + 0.25 * 4 * kl),
                                                                                    rel=1e-5)


def teacher_run(config, run_dir, tmp_path):
    """A wider model trained for a few steps on the same run's tokenizer and shards."""
    teacher = tmp_path / "teacher"
    fork_run(run_dir, teacher)
    train(load_config(config, [f"run.dir={teacher}", "model.n_embd=48", "model.n_head=3", "train.max_steps=10"]))
    return teacher


@pytest.mark.slow
def test_a_distilled_run_resumes_exactly(tiny_run, tmp_path, monkeypatch):
    config, run_dir = tiny_run
    teacher = teacher_run(config, run_dir, tmp_path)
    sets = [f"train.distill_from={teacher}", "train.distill_alpha=0.7", "train.distill_temperature=2",
            "train.max_steps=8", "train.checkpoint_every=4"]
    interrupted_at(3, load_config(config, sets), monkeypatch)
    resumed = train(load_config(config, sets))
    assert resumed.resumed_from == "step-00000003"
    assert "distilling from" in (run_dir / "train.log").read_text()
    straight = tmp_path / "straight"
    fork_run(run_dir, straight)
    other = train(load_config(config, sets + [f"run.dir={straight}"]))
    ours, theirs = load_file(str(resumed.checkpoint / "model.safetensors")), load_file(str(other.checkpoint / "model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    alone = tmp_path / "alone"
    fork_run(run_dir, alone)
    plain = train(load_config(config, ["train.max_steps=8", "train.checkpoint_every=4", f"run.dir={alone}"]))
    assert plain.history[0]["loss"] != other.history[0]["loss"]  # the teacher changed the objective


@pytest.mark.slow
def test_a_teacher_from_a_hf_directory_and_one_with_another_tokenizer(tiny_run, tmp_path):
    pytest.importorskip("transformers")
    config, run_dir = tiny_run
    teacher = teacher_run(config, run_dir, tmp_path)
    hf = tmp_path / "hf"
    assert run_cli("export", "--run", str(teacher), "--format", "hf", "--out", str(hf)).returncode == 0
    ok = run_cli("train", "--config", str(config), "--set", f"train.distill_from={hf}", "--set", "train.max_steps=2")
    assert ok.returncode == 0, ok.stderr
    raw = json.loads((hf / "tokenizer.json").read_text())
    raw["added_tokens"].append({"id": 300, "content": "<|other|>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (hf / "tokenizer.json").write_text(json.dumps(raw))
    hf_config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**hf_config, "vocab_size": 301}))  # a whole source, another tokenizer
    refused = run_cli("train", "--config", str(config), "--set", f"train.distill_from={hf}", "--set", "train.max_steps=4")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "its tokenizer differs from the run's" in refused.stderr and "train.distill_from" in refused.stderr
