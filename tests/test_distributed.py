"""torchrun with 2 CPU processes (gloo): replicas stay in sync, resume works, and the loss equals
a single process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from lmtrain.config import load_config
from lmtrain.rundir import fork_run
from lmtrain.train import train


def torchrun(config, *sets):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lmtrain", "train", "--config", str(config)]
    for item in sets:
        cmd += ["--set", item]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def step_losses(log_text):
    out = {}
    for line in log_text.splitlines():
        if ": loss " in line:
            step = int(line.split("step ")[1].split(":")[0])
            out[step] = float(line.split(": loss ")[1].split(",")[0])
    return out


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tiny_run, tmp_path):
    config, run_dir = tiny_run
    # A task of 5 items: the ranks score 3 and 2 of them, and the log reports all 5.
    tasks = tmp_path / "mc.jsonl"
    tasks.write_text("".join(json.dumps({"context": f"def f{i}(x):\n    return", "label": i % 2,
                                         "choices": [f"x + {i}", "None"]}) + "\n" for i in range(5)))
    result = torchrun(config, "train.max_steps=6", "train.checkpoint_every=3", "train.grad_accum=1",
                      f"train.eval_tasks={tasks}")
    assert result.returncode == 0, result.stderr[-3000:]
    log_text = (run_dir / "train.log").read_text()
    assert "all 2 replicas hold identical weights" in log_text
    assert "4 x 1 grad_accum x 2 processes = 8 sequences" in log_text
    ddp_losses = step_losses(log_text)
    ddp_task_acc = {int(line.split("step ")[1].split(":")[0]): float(line.split(": acc ")[1].split(",")[0])
                    for line in log_text.splitlines() if "task mc: acc" in line}
    assert sorted(ddp_task_acc) == [3, 5, 6] and "(5 items, chance 0.5000)" in log_text

    resumed = torchrun(config, "train.max_steps=8", "train.checkpoint_every=3", "train.grad_accum=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step-00000006" in (run_dir / "train.log").read_text()
    ddp_weights = load_file(str(run_dir / "checkpoints" / "step-00000008" / "model.safetensors"))

    # One process, grad_accum 2: the same 8 sequences per step, the same windows.
    single_dir = tmp_path / "single"
    fork_run(run_dir, single_dir)
    base = [f"run.dir={single_dir}", "train.checkpoint_every=3", "train.grad_accum=2"]
    single = train(load_config(config, base + ["train.max_steps=6", f"train.eval_tasks={tasks}"]))
    single_task_acc = {h["step"]: h["tasks/mc/acc"] for h in single.history if "tasks/mc/acc" in h}
    assert single_task_acc == pytest.approx(ddp_task_acc)
    single_more = train(load_config(config, base + ["train.max_steps=8"]))
    single_losses = {h["step"]: h["loss"] for h in single.history + single_more.history if "loss" in h}
    for step, loss in ddp_losses.items():
        assert abs(loss - single_losses[step]) < 1e-4, (step, loss, single_losses[step])
    single_weights = load_file(str(single_dir / "checkpoints" / "step-00000008" / "model.safetensors"))
    for key, value in single_weights.items():
        torch.testing.assert_close(ddp_weights[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_muon_replicas_stay_identical(tiny_run):
    """Muon under DDP: gradients are averaged before the step, every rank orthogonalises the same
    update, and the replica check finds the weights identical. With a time budget the ranks take
    one decision on the step count (the slowest rank's figures) and finish together."""
    config, run_dir = tiny_run
    result = torchrun(config, "train.max_minutes=0.1", "train.checkpoint_every=1000", "train.optimizer=muon",
                      "model.qk_norm=true", "model.pos_embedding=rope", "train.log_every=50")
    assert result.returncode == 0, result.stderr[-3000:]
    log_text = (run_dir / "train.log").read_text()
    assert "all 2 replicas hold identical weights" in log_text
    assert "so the schedule ends at step" in log_text and "budget 0.1 min:" in log_text


@pytest.mark.slow
def test_distillation_under_ddp_matches_one_process(tiny_run, tmp_path):
    """Every rank runs the teacher on its own micro-batches: the mixed loss averages like any other."""
    from test_distill import teacher_run

    config, run_dir = tiny_run
    teacher = teacher_run(config, run_dir, tmp_path)
    sets = [f"train.distill_from={teacher}", "train.max_steps=4", "train.checkpoint_every=4"]
    result = torchrun(config, *sets, "train.grad_accum=1")
    assert result.returncode == 0, result.stderr[-3000:]
    ddp_losses = step_losses((run_dir / "train.log").read_text())
    single_dir = tmp_path / "single"
    fork_run(run_dir, single_dir)
    single = train(load_config(config, sets + ["train.grad_accum=2", f"run.dir={single_dir}"]))
    single_losses = {h["step"]: h["loss"] for h in single.history if "loss" in h}
    assert sorted(ddp_losses) == [1, 2, 3, 4]
    for step, loss in ddp_losses.items():
        assert abs(loss - single_losses[step]) < 1e-4, (step, loss, single_losses[step])


@pytest.mark.slow
def test_lora_under_ddp_matches_one_process(tiny_run, tmp_path):
    """Only the adapters have gradients to average; the frozen base is the same on every rank."""
    from test_lora import base_run, lora_dir, lora_sets

    config, run_dir = tiny_run
    base = base_run(config, run_dir, steps=4)
    sets = lora_sets(lora_dir(run_dir, tmp_path, "ddp"), base, "train.max_steps=4", "train.lora_targets=[q,v,up]")
    result = torchrun(config, *sets, "train.grad_accum=1")
    assert result.returncode == 0, result.stderr[-3000:]
    log_text = (tmp_path / "ddp" / "train.log").read_text()
    assert "all 2 replicas hold identical weights" in log_text
    single_dir = lora_dir(run_dir, tmp_path, "single")
    single = train(load_config(config, sets + [f"run.dir={single_dir}", "train.grad_accum=2"]))
    single_losses = {h["step"]: h["loss"] for h in single.history if "loss" in h}
    ddp_losses = step_losses(log_text)
    assert sorted(ddp_losses) == [1, 2, 3, 4]
    for step, loss in ddp_losses.items():
        assert abs(loss - single_losses[step]) < 1e-4, (step, loss, single_losses[step])
