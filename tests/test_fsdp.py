"""train.parallel: fsdp with 2 CPU processes (gloo): the same losses as one process with the same
global batch, checkpoints in the one format every command reads, exact resume after SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli, wait_for_line
from lmtrain.config import load_config
from lmtrain.rundir import fork_run
from lmtrain.train import train
from test_distributed import step_losses, torchrun

pytestmark = pytest.mark.slow


def copy_prepared(run_dir, target):
    fork_run(run_dir, target)
    return target


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fsdp_matches_one_process_and_its_checkpoints_load_anywhere(tiny_run, tmp_path, optimizer):
    config, run_dir = tiny_run
    # 5 items: the ranks score 3 and 2, so the second pads its forward passes to match the first.
    tasks = tmp_path / "mc.jsonl"
    tasks.write_text("".join(json.dumps({"context": f"def f{i}(x):\n    return", "label": i % 2,
                                         "choices": [f"x + {i}", "None"]}) + "\n" for i in range(5)))
    common = ["train.checkpoint_every=3", f"train.optimizer={optimizer}", "model.pos_embedding=rope"]
    result = torchrun(config, *common, "train.parallel=fsdp", "train.max_steps=6", "train.grad_accum=1",
                      f"train.eval_tasks={tasks}", "train.sample_every=3")
    assert result.returncode == 0, result.stderr[-3000:]
    log_text = (run_dir / "train.log").read_text()
    assert "all 2 ranks agree on the optimiser's step counts and buffers (weights are sharded)" in log_text
    fsdp_losses = step_losses(log_text)
    fsdp_acc = {int(line.split("step ")[1].split(":")[0]): float(line.split(": acc ")[1].split(",")[0])
                for line in log_text.splitlines() if "task mc: acc" in line}
    assert sorted(fsdp_losses) == [1, 2, 3, 4, 5, 6] and sorted(fsdp_acc) == [3, 5, 6]

    # One process, grad_accum 2: the same 8 sequences per step.
    single_dir = copy_prepared(run_dir, tmp_path / "single")
    base = [f"run.dir={single_dir}", *common, "train.grad_accum=2", f"train.eval_tasks={tasks}"]
    single = train(load_config(config, base + ["train.max_steps=6"]))
    single_losses = {h["step"]: h["loss"] for h in single.history if "loss" in h}
    for step, loss in fsdp_losses.items():
        assert abs(loss - single_losses[step]) < 1e-4, (step, loss, single_losses[step])
    assert {h["step"]: h["tasks/mc/acc"] for h in single.history if "tasks/mc/acc" in h} == pytest.approx(fsdp_acc)
    fsdp_weights = load_file(str(run_dir / "checkpoints" / "step-00000006" / "model.safetensors"))
    single_weights = load_file(str(single_dir / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert fsdp_weights.keys() == single_weights.keys()
    for key, value in single_weights.items():
        torch.testing.assert_close(fsdp_weights[key], value, rtol=1e-4, atol=1e-5)

    # The FSDP checkpoint (gathered whole) resumes in one process, with its optimiser state.
    resumed = train(load_config(config, [*common, "train.grad_accum=2", "train.max_steps=8"]))
    assert resumed.resumed_from == "step-00000006"
    more = train(load_config(config, base + ["train.max_steps=8"]))
    for step in (7, 8):
        mine = next(h["loss"] for h in resumed.history if h.get("step") == step and "loss" in h)
        theirs = next(h["loss"] for h in more.history if h.get("step") == step and "loss" in h)
        assert abs(mine - theirs) < 1e-4, (step, mine, theirs)
    # ... and `lmtrain sample` reads it.
    sampled = run_cli("sample", "--run", str(run_dir), "-n", "5")
    assert sampled.returncode == 0, sampled.stderr

    if optimizer == "muon":
        return  # the rest is the same for both optimisers
    # A checkpoint of one process resumes under FSDP (each rank keeps its shard of the moments).
    again = torchrun(config, *common, "train.parallel=fsdp", "train.max_steps=9", "train.grad_accum=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step-00000008" in (run_dir / "train.log").read_text()


def test_fsdp_resumes_exactly_after_sigterm(tiny_run, tmp_path):
    config, run_dir = tiny_run
    common = ["train.parallel=fsdp", "train.max_steps=20", "train.checkpoint_every=100", "train.eval_every=100"]
    straight_dir = copy_prepared(run_dir, tmp_path / "straight")
    straight = torchrun(config, *common, f"run.dir={straight_dir}")
    assert straight.returncode == 0, straight.stderr[-3000:]

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmtrain",
           "train", "--config", str(config)] + [arg for item in common for arg in ("--set", item)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(run_dir / "train.log", "step 3:", poll=0.1)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    proc.communicate(timeout=120)
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert 3 <= int(latest.split("-")[1]) < 20, latest
    resumed = torchrun(config, *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {latest}" in (run_dir / "train.log").read_text()
    ours = load_file(str(run_dir / "checkpoints" / "step-00000020" / "model.safetensors"))
    theirs = load_file(str(straight_dir / "checkpoints" / "step-00000020" / "model.safetensors"))
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
