"""LoRA (train.lora_*): only the adapters train, checkpoints hold them and a fingerprint of the
base, resume is exact, sample/eval/export apply them, peft loads `--format peft` on top of the
base's transformers export and computes the same logits, and what cannot work is one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from lmtrain.config import load_config
from lmtrain.errors import CheckpointError, ConfigError
from lmtrain.inference import load_model
from lmtrain.rundir import fork_run
from lmtrain.train import train
from test_train import interrupted_at

LLAMA = ["model.pos_embedding=rope", "model.norm=rmsnorm", "model.mlp=swiglu"]
GPT2 = ["model.pos_embedding=learned", "model.norm=layernorm", "model.mlp=gelu", "model.bias=true"]


def base_run(config, run_dir, arch=LLAMA, steps=10):
    """The base: a tiny model trained on the run's tokenizer and shards (with a large learning rate,
    so its weights are far from their initialisation)."""
    train(load_config(config, arch + [f"train.max_steps={steps}", "train.lr=3e-2", "train.checkpoint_every=10"]))
    return run_dir


def lora_dir(run_dir, tmp_path, name="lora"):
    """A new run directory on the base's tokenizer and shards."""
    directory = tmp_path / name
    fork_run(run_dir, directory)
    return directory


def lora_sets(directory, base, *extra):
    return [f"run.dir={directory}", f"model.init_from={base}", "train.lora_rank=4", "train.lr=2e-2",
            "train.max_steps=8", "train.checkpoint_every=4", *extra]


@pytest.mark.slow
def test_only_the_adapters_train_and_checkpoints_hold_only_them(tiny_run, tmp_path):
    config, run_dir = tiny_run
    base = base_run(config, run_dir)
    lora = lora_dir(run_dir, tmp_path)
    result = train(load_config(config, lora_sets(lora, base, "train.lora_targets=[q,v,down]")))
    base_state = json.loads((base / "checkpoints" / "step-00000010" / "state.json").read_text())
    assert result.val_loss < base_state["last_val"]["val_loss"]  # the same val windows: the adapters helped
    saved = load_file(str(result.checkpoint / "model.safetensors"))
    assert set(saved) == {f"blocks.{i}.{layer}.lora_{ab}.{t}" for i in range(2) for ab in "AB"
                          for layer, t in (("attn.qkv", "q"), ("attn.qkv", "v"), ("mlp.proj", "down"))}
    base_file = base / "checkpoints" / "step-00000010" / "model.safetensors"
    assert (result.checkpoint / "model.safetensors").stat().st_size < base_file.stat().st_size / 4
    state = json.loads((result.checkpoint / "state.json").read_text())
    assert state["lora"]["base"] == str((base / "checkpoints" / "step-00000010").resolve())
    assert "of model.init_from" in (lora / "train.log").read_text() and "parameters train" in (lora / "train.log").read_text()
    # The merged model: the base everywhere but the adapted rows, which moved.
    before, after = load_model(base, "latest", "cpu").model.state_dict(), load_model(lora, "latest", "cpu").model.state_dict()
    C = 32
    for key in before:
        if key.endswith("attn.qkv.weight"):
            assert torch.equal(before[key][C:2 * C], after[key][C:2 * C])  # k: no adapter
            assert not torch.equal(before[key][:C], after[key][:C]) and not torch.equal(before[key][2 * C:], after[key][2 * C:])
        elif key.endswith("mlp.proj.weight"):
            assert not torch.equal(before[key], after[key])
        else:
            assert torch.equal(before[key], after[key]), key
    # Merging changes nothing: the adapters unmerged compute the merged model's logits.
    from lmtrain.lora import LoraRecord, add_adapters, load_trainable

    unmerged = load_model(base, "latest", "cpu").model
    add_adapters(unmerged, LoraRecord.from_state(state, result.checkpoint).spec)
    load_trainable(unmerged, saved, result.checkpoint)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(unmerged(ids)[0], load_model(lora, "latest", "cpu").model(ids)[0],
                                   rtol=1e-5, atol=1e-5)
    # Another run can start from the LoRA run (its merged weights), as from any run.
    from lmtrain.model import GPT
    from lmtrain.pretrained import open_source
    from lmtrain.restore import Pretrained

    model = GPT(load_model(lora, "latest", "cpu").model.config)
    Pretrained(open_source(str(lora))).weights(model)
    assert all(torch.equal(v, after[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_a_lora_run_resumes_exactly_and_refuses_another_base(tiny_run, tmp_path, monkeypatch):
    config, run_dir = tiny_run
    base = base_run(config, run_dir)
    sets = lora_sets(lora_dir(run_dir, tmp_path), base, "train.lora_dropout=0.1", "train.lora_train_norms=true")
    interrupted_at(3, load_config(config, sets), monkeypatch)
    resumed = train(load_config(config, sets))
    assert resumed.resumed_from == "step-00000003"
    straight = train(load_config(config, sets[1:] + [f"run.dir={lora_dir(run_dir, tmp_path, 'straight')}"]))
    ours, theirs = load_file(str(resumed.checkpoint / "model.safetensors")), load_file(str(straight.checkpoint / "model.safetensors"))
    assert ours.keys() == theirs.keys() and any("norm" in k for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # The base trains on: its latest checkpoint, which model.init_from names, is other weights now.
    train(load_config(config, LLAMA + ["train.max_steps=12", "train.lr=3e-2", "train.checkpoint_every=10"]))
    more = [s.replace("max_steps=8", "max_steps=10") for s in sets]
    refused = run_cli("train", "--config", str(config), *[a for s in more for a in ("--set", s)])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "its adapters were trained on" in refused.stderr and "--restart" in refused.stderr
    # The LoRA run's own checkpoints still read their recorded base (the base's step-00000010).
    assert load_model(straight.run_dir, "latest", "cpu").step == 8
    restarted = run_cli("train", "--config", str(config), "--restart", *[a for s in more for a in ("--set", s)])
    assert restarted.returncode == 0, restarted.stderr
    with pytest.raises(CheckpointError, match="train.lora_rank: checkpoint 4, config 8"):
        train(load_config(config, more + ["train.lora_rank=8"]))
    with pytest.raises(CheckpointError, match="it holds LoRA adapters"):
        train(load_config(config, more + ["train.lora_rank=0"]))


ARCHS = {"llama": (LLAMA, "[q,v,gate,down]"), "gpt2": (GPT2, "[q,v,up]")}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_loads_the_adapters_on_the_base_export(tiny_run, tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config, run_dir = tiny_run
    sets, targets = ARCHS[arch]
    base = base_run(config, run_dir, sets)
    lora = lora_dir(run_dir, tmp_path)
    train(load_config(config, lora_sets(lora, base, f"train.lora_targets={targets}", "train.lora_train_norms=true",
                                        "train.lr=5e-2")))
    for args in (["--run", str(base), "--format", "hf", "--out", str(tmp_path / "base-hf")],
                 ["--run", str(lora), "--format", "peft", "--out", str(tmp_path / "adapter")],
                 ["--run", str(lora), "--format", "hf", "--out", str(tmp_path / "merged-hf")]):
        done = run_cli("export", *args)
        assert done.returncode == 0, done.stderr
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["modules_to_save"]
    ours = load_model(lora, "best", "cpu").model
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf", dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged-hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ours(ids)[0]
        torch.testing.assert_close(with_adapter(ids).logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf", dtype=torch.float32)(ids).logits
    assert (plain - expected).abs().max() > 1e-2  # the adapters matter


@pytest.mark.slow
def test_sample_and_eval_apply_the_adapters_and_a_missing_base_is_one_line(tiny_run, tmp_path):
    config, run_dir = tiny_run
    base = base_run(config, run_dir)
    moved = tmp_path / "base-moved"
    shutil.copytree(base, moved)
    lora = lora_dir(run_dir, tmp_path)
    result = train(load_config(config, lora_sets(lora, moved)))
    sampled = run_cli("sample", "--run", str(lora), "-n", "8", "--seed", "1")
    assert sampled.returncode == 0 and sampled.stdout.strip(), sampled.stderr
    evaluated = run_cli("eval", "--run", str(lora), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    of_base = run_cli("eval", "--run", str(moved), "--json")
    assert json.loads(evaluated.stdout)["loss"] < json.loads(of_base.stdout)["loss"]  # the adapters applied
    shutil.rmtree(moved)
    gone = run_cli("sample", "--run", str(lora), "-n", "4")
    assert gone.returncode == 2 and "Traceback" not in gone.stderr
    assert "the base of the LoRA adapters" in gone.stderr and "no such file or directory" in gone.stderr


@pytest.mark.slow
def test_settings_lora_cannot_train_with_are_refused(tiny_run, tmp_path):
    config, run_dir = tiny_run
    base = base_run(config, run_dir, GPT2, steps=2)
    lora = lora_dir(run_dir, tmp_path)
    with pytest.raises(ConfigError, match="gate is SwiGLU's gate projection"):
        train(load_config(config, lora_sets(lora, base, "train.lora_targets=[gate]")))
    with pytest.raises(ConfigError, match="each named once"):
        load_config(config, lora_sets(lora, base, "train.lora_targets=[q,q]"))
    assert not (lora / "checkpoints").exists()


def test_the_memory_estimate_counts_gradients_and_moments_of_the_adapters_only(tiny_run):
    from lmtrain.memory import estimate

    config, _ = tiny_run
    full = estimate(load_config(config, LLAMA), 300, None)
    lora = estimate(load_config(config, LLAMA + ["train.lora_rank=2", "train.lora_targets=[q,v]",
                                                 "model.init_from=base"]), 300, None)
    adapters = 2 * 2 * (2 * 32 + 2 * 32)  # layers x (q, v) x (A: 2 x 32, B: 32 x 2)
    assert lora.parameters == full.parameters + adapters
    assert lora.gradients == 4 * adapters and lora.optimizer == 8 * adapters


def test_mfu_counts_no_weight_gradients_for_the_frozen_base():
    from lmtrain.config import ArchitectureConfig
    from lmtrain.lora import LoraSpec, add_adapters, training_flops_per_token
    from lmtrain.model import GPT, GPTConfig

    model = GPT(GPTConfig.of(ArchitectureConfig(n_layer=2, n_head=2, n_embd=32, block_size=32), 300))
    assert training_flops_per_token(model) == model.flops_per_token()
    whole = model.flops_per_token()
    add_adapters(model, LoraSpec(rank=2, alpha=4, targets=("q",), train_norms=False))
    adapters = 2 * (2 * 32 + 32 * 2)  # layers x (A: 2 x 32 + B: 32 x 2)
    norms = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    frozen = model.num_params(embeddings=False) - adapters - norms + model.lm_head.weight.numel()  # + the tied head
    # 6N over everything (adapters included), less 2N for every frozen matrix (norms are not matmuls).
    assert training_flops_per_token(model) == model.flops_per_token() - 2 * frozen
    assert training_flops_per_token(model) < whole
