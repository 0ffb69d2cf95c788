"""In and out, verified by the consumers: transformers and gguf load what `lmtrain export` writes
and compute the same logits; `model.init_from` starts from Hugging Face or lmtrain weights."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli
from lmtrain.config import load_config
from lmtrain.export import export
from lmtrain.inference import load_model
from lmtrain.train import train

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

ARCHS = {"llama": ["model.pos_embedding=rope", "model.norm=rmsnorm", "model.mlp=swiglu"],
         "gpt2": ["model.pos_embedding=learned", "model.norm=layernorm", "model.mlp=gelu"],
         "starcoder2": ["model.pos_embedding=rope", "model.norm=layernorm", "model.mlp=gelu"],
         "stablelm": ["model.pos_embedding=rope", "model.norm=layernorm", "model.mlp=swiglu"]}
CLASSES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "starcoder2": "Starcoder2ForCausalLM",
           "stablelm": "StableLmForCausalLM"}
VARIANTS = [(arch, bias, tie) for arch, bias, tie in itertools.product(ARCHS, [False, True], [True, False])
            if not (arch == "stablelm" and bias)]  # StableLM has no MLP biases: refused (tested below)
HARD_TEXT = "naïve café 世界 👋🏽 e\u0301 \x00\x01\t\r\n  def f(x):\n\treturn x  # ok\u200b!"


def trained(config, arch: str, bias: bool, tie: bool, steps: int = 3):
    sets = ARCHS[arch] + [f"model.bias={str(bias).lower()}", f"model.tie_embeddings={str(tie).lower()}",
                          f"train.max_steps={steps}", "train.lr=3e-2"]  # a large lr: weights far from init
    train(load_config(config, sets))
    return sets


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.parametrize("arch, bias, tie", VARIANTS, ids=[f"{a}-bias{int(b)}-tie{int(t)}" for a, b, t in VARIANTS])
def test_transformers_computes_the_same_logits(tiny_run, tmp_path, arch, bias, tie):
    config, run_dir = tiny_run
    trained(config, arch, bias, tie)
    result = export(run_dir, "hf", tmp_path / "hf")
    assert result.architecture == arch
    ours = load_model(run_dir, "latest", "cpu")
    theirs = hf_model(tmp_path / "hf")
    assert type(theirs).__name__ == CLASSES[arch]
    assert theirs.config.vocab_size == ours.tokenizer.get_vocab_size() == 300  # no padded rows
    ids = torch.randint(0, 300, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, _ = ours.model(ids)
        got = theirs(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # every position: RoPE layout shows past 0


OPTION_VARIANTS = {
    "Qwen3ForCausalLM": ARCHS["llama"] + ["model.qk_norm=true", "model.tie_embeddings=false"],
    "GPT2LMHeadModel": ARCHS["gpt2"][:2] + ["model.mlp=relu2", "model.bias=true"],
    "Starcoder2ForCausalLM": ARCHS["starcoder2"][:2] + ["model.mlp=relu2", "model.zero_init_proj=true"],
}


@pytest.mark.slow
@pytest.mark.parametrize("cls", OPTION_VARIANTS)
def test_speedrun_options_export_exactly(tiny_run, tmp_path, cls):
    """model.qk_norm exports as Qwen3 and model.mlp relu2 as GPT-2/Starcoder2 with relu2: the same logits."""
    config, run_dir = tiny_run
    train(load_config(config, OPTION_VARIANTS[cls] + ["train.max_steps=3", "train.lr=3e-2"]))
    export(run_dir, "hf", tmp_path / "hf")
    ours = load_model(run_dir, "latest", "cpu")
    theirs = hf_model(tmp_path / "hf")
    assert type(theirs).__name__ == cls
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours.model(ids)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trained_export_tokenizer_and_greedy_generation_agree(tiny_run, tmp_path, arch):
    from lmtrain.generate import SamplingParams, generate

    config, run_dir = tiny_run
    trained(config, arch, arch == "gpt2", arch == "llama", steps=30)
    export(run_dir, "hf", tmp_path / "hf")
    ours = load_model(run_dir, "latest", "cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer(HARD_TEXT)["input_ids"]
    assert ids == ours.tokenizer.encode(HARD_TEXT, add_special_tokens=False).ids  # no BOS added
    assert tokenizer.decode(ids) == HARD_TEXT  # byte-exact: no clean-up of spaces
    assert tokenizer.model_max_length == 32
    # transformers' greedy generate() == lmtrain's, 30 tokens (end-of-text not stopping either).
    prompt = "def "
    inputs = tokenizer(prompt, return_tensors="pt")
    model = hf_model(tmp_path / "hf")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=30, min_new_tokens=30, eos_token_id=None)
    theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
    mine = [int(t) for t in generate(ours.model, inputs["input_ids"], 30, SamplingParams(temperature=0.0))]
    assert len(theirs) == 30 and theirs == mine
    # ... and `lmtrain sample --greedy` prints exactly that text (it stops at end-of-text).
    cli = run_cli("sample", "--run", str(run_dir), "--prompt", prompt, "--greedy", "-n", "30")
    assert cli.returncode == 0, cli.stderr
    upto = theirs.index(ours.eot_id) if ours.eot_id in theirs else 30
    assert cli.stdout == prompt + tokenizer.decode(theirs[:upto]) + "\n"
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "bits per byte" in card and "step-00000030" in card


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gguf_holds_every_tensor_and_the_tokenizer(tiny_run, tmp_path, arch):
    from lmtrain.hf_format import to_hf

    config, run_dir = tiny_run
    trained(config, arch, arch == "gpt2", arch == "llama")
    path = tmp_path / "model.gguf"
    export(run_dir, "gguf", path)
    reader = gguf.GGUFReader(str(path))
    fields = {name: field for name, field in reader.fields.items()}
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("general.architecture") == arch
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    ours = load_model(run_dir, "latest", "cpu")
    assert value("tokenizer.ggml.tokens") == [ours.tokenizer.id_to_token(i) for i in range(300)]
    assert value("tokenizer.ggml.eos_token_id") == ours.eot_id and value("tokenizer.ggml.add_bos_token") is False
    assert value(f"{arch}.context_length") == 32 and value(f"{arch}.block_count") == 2
    tensors = {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    hf = to_hf(ours.model.state_dict(), ours.model.config)
    if arch == "llama":
        np.testing.assert_array_equal(_unpermute(tensors["blk.1.attn_q.weight"], 2),
                                      hf["model.layers.1.self_attn.q_proj.weight"].numpy())
        np.testing.assert_array_equal(_unpermute(tensors["blk.0.attn_k.weight"], 2),
                                      hf["model.layers.0.self_attn.k_proj.weight"].numpy())
        np.testing.assert_array_equal(tensors["blk.1.ffn_gate.weight"], hf["model.layers.1.mlp.gate_proj.weight"].numpy())
        np.testing.assert_array_equal(tensors["token_embd.weight"], hf["model.embed_tokens.weight"].numpy())
        assert len(tensors) == 2 + 9 * 2 + 1
    else:
        np.testing.assert_array_equal(tensors["blk.0.attn_qkv.weight"], ours.model.state_dict()["blocks.0.attn.qkv.weight"].numpy())
        np.testing.assert_array_equal(tensors["blk.1.ffn_down.bias"], ours.model.state_dict()["blocks.1.mlp.proj.bias"].numpy())
        np.testing.assert_array_equal(tensors["position_embd.weight"], hf["transformer.wpe.weight"].numpy())
        assert len(tensors) == 3 + 12 * 2 + 2
    # transformers reads GGUF too (it undoes llama.cpp's q/k layout): the same logits again. Its
    # GPT-2 reader ignores gpt2.context_length (llama.cpp's key) and assumes 1024 positions.
    extra = {"n_positions": 32} if arch == "gpt2" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32,
                                                              **extra).eval()
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours.model(ids)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantized_gguf_reads_back_within_its_types_error(tiny_run, tmp_path, arch):
    """--quant: every type reads back (gguf's reader, dequantized) to logits within a tolerance
    that grows as the bits shrink; transformers' GGUF loader dequantizes q8_0 to the same model;
    `lmtrain eval --gguf` scores the quantized file on the val split."""
    from lmtrain.export import read_gguf

    config, run_dir = tiny_run
    trained(config, arch, arch == "gpt2", arch == "llama")
    ours = load_model(run_dir, "latest", "cpu")
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = ours.model(ids)[0]
    sizes, errors = {}, {}
    for quant in ("f32", "f16", "bf16", "q8_0", "q5_1", "q4_0"):
        path = tmp_path / f"m-{quant}.gguf"
        export(run_dir, "gguf", path, quant=quant)
        sizes[quant] = path.stat().st_size
        state, tokens = read_gguf(path, ours.model.config)
        assert tokens == [ours.tokenizer.id_to_token(i) for i in range(300)]
        model = load_model(run_dir, "latest", "cpu")
        from lmtrain.export import load_gguf_into

        load_gguf_into(model, path)
        with torch.no_grad():
            errors[quant] = float((model.model(ids)[0] - reference).abs().max() / reference.abs().max())
    assert errors["f32"] == 0.0 and errors["f16"] < 2e-3 and errors["bf16"] < 2e-2 and errors["q8_0"] < 2e-2
    assert errors["q4_0"] < 0.25 and sizes["bf16"] == sizes["f16"]
    assert errors["f16"] <= errors["q8_0"] <= errors["q5_1"] <= errors["q4_0"]
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q5_1"] > sizes["q4_0"]
    extra = {"n_positions": 32} if arch == "gpt2" else {}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m-q8_0.gguf", dtype=torch.float32,
                                                               **extra).eval()
    model = load_model(run_dir, "latest", "cpu")
    from lmtrain.export import load_gguf_into

    load_gguf_into(model, tmp_path / "m-q8_0.gguf")
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model.model(ids)[0], rtol=1e-4, atol=1e-4)
    scored = run_cli("eval", "--run", str(run_dir), "--gguf", str(tmp_path / "m-q4_0.gguf"), "--json")
    plain = run_cli("eval", "--run", str(run_dir), "--json")
    assert scored.returncode == 0 and plain.returncode == 0, scored.stderr + plain.stderr
    q4, fp = json.loads(scored.stdout), json.loads(plain.stdout)
    assert q4["checkpoint"].endswith("m-q4_0.gguf") and q4["tokens"] == fp["tokens"] and q4["bpb"] != fp["bpb"]
    assert abs(q4["bpb"] - fp["bpb"]) < 0.2 * fp["bpb"]


@pytest.mark.slow
def test_export_refuses_and_overwrites_only_with_force(tiny_run, tmp_path):
    config, run_dir = tiny_run
    trained(config, "llama", False, True)
    out = tmp_path / "hf"
    assert run_cli("export", "--run", str(run_dir), "--format", "hf", "--out", str(out)).returncode == 0
    again = run_cli("export", "--run", str(run_dir), "--format", "hf", "--out", str(out))
    assert again.returncode == 2 and "already exists; --force replaces it" in again.stderr
    forced = run_cli("export", "--run", str(run_dir), "--format", "hf", "--out", str(out), "--force", "--dtype", "bf16")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("hf.")]  # no temporaries left


# -- model.init_from -----------------------------------------------------------------------------


@pytest.mark.slow
def test_lmtrain_to_hf_to_init_from_keeps_the_val_loss(tiny_run, tmp_path):
    config, run_dir = tiny_run
    trained(config, "llama", False, True, steps=20)
    first = load_model(run_dir, "latest", "cpu")
    export(run_dir, "hf", tmp_path / "hf", "latest")
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run_dir / "checkpoints" / latest / "state.json").read_text())
    # A new run starting from the export, on the same corpus: a 1e-12 learning rate leaves the
    # weights where they were, so its first evaluation is the source's val loss.
    fine = tmp_path / "fine"
    sets = [f"run.dir={fine}", f"model.init_from={tmp_path / 'hf'}", "train.max_steps=1", "train.lr=1e-12",
            "train.min_lr=0", "train.warmup_steps=0", "train.weight_decay=0"]
    tok = run_cli("tokenize", "--config", str(config), *[a for s in sets for a in ("--set", s)])
    assert tok.returncode == 0 and "taken from model.init_from" in tok.stdout, tok.stderr
    assert (fine / "tokenizer" / "tokenizer.json").read_bytes() == (run_dir / "tokenizer" / "tokenizer.json").read_bytes()
    from lmtrain.prepare import build_shards

    build_shards(load_config(config, sets))
    result = train(load_config(config, sets))
    assert result.val_loss == pytest.approx(state["last_val"]["val_loss"], abs=1e-6)
    resolved = load_config(fine / "config.yaml")
    assert (resolved.model.pos_embedding, resolved.model.norm, resolved.model.n_layer) == ("rope", "rmsnorm", 2)
    assert first.model.config.vocab_size == load_model(fine, "latest", "cpu").model.config.vocab_size


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_transformers_model_loads_through_init_from(tiny_run, tmp_path, arch):
    config, run_dir = tiny_run
    torch.manual_seed(0)
    if arch == "llama":
        hf_config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=32, rms_norm_eps=1e-6, rope_theta=500.0,
                                             tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
        model = transformers.LlamaForCausalLM(hf_config)
    else:
        hf_config = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                            bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(hf_config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)  # norms and biases away from 1 and 0 too
    model.eval().save_pretrained(tmp_path / "src")
    shutil.copyfile(run_dir / "tokenizer" / "tokenizer.json", tmp_path / "src" / "tokenizer.json")
    fine = tmp_path / "fine"
    shutil.copytree(run_dir / "tokenizer", fine / "tokenizer")  # the same file the source carries
    shutil.copytree(run_dir / "data", fine / "data")
    train(load_config(config, [f"run.dir={fine}", f"model.init_from={tmp_path / 'src'}", "train.max_steps=1",
                               "train.lr=1e-12", "train.min_lr=0", "train.warmup_steps=0", "train.weight_decay=0"]))
    ours = load_model(fine, "latest", "cpu")
    assert ours.model.config.rope_theta == (500.0 if arch == "llama" else 10000.0)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours.model(ids)[0], model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_init_from_refuses_what_it_cannot_reproduce(tiny_run, tmp_path):
    config, run_dir = tiny_run

    def source(name: str, **changes) -> str:
        fields = dict(vocab_size=300, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32,
                      eos_token_id=0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**fields, **changes})).save_pretrained(tmp_path / name)
        shutil.copyfile(run_dir / "tokenizer" / "tokenizer.json", tmp_path / name / "tokenizer.json")
        return f"model.init_from={tmp_path / name}"

    def refused(*sets: str) -> str:
        from lmtrain.errors import ConfigError
        from lmtrain.pretrained import resolve

        with pytest.raises(ConfigError) as info:
            resolve(load_config(config, list(sets)))
        return str(info.value)

    # Grouped-query attention, other epsilons and MLP widths are exact now (tests/test_real_models.py);
    # what lmtrain would still only approximate is refused.
    dynamic = source("dynamic", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    result = run_cli("train", "--config", str(config), "--set", dynamic)  # through the CLI once: one line, exit 2
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "rope scaling of type 'dynamic'" in result.stderr
    assert "hidden_act 'gelu'" in refused(source("act", hidden_act="gelu"))
    assert "not a multiple of num_key_value_heads 3" in refused(source("ratio", num_key_value_heads=3, num_attention_heads=4,
                                                                        hidden_size=32))
    good = source("good")
    assert "model.n_layer: the config says 5, the source has 2" in refused(good, "model.n_layer=5")
    both = refused(good, "model.n_layer=5", "model.n_embd=64")  # every reason at once, not one per attempt
    assert "model.n_layer: the config says 5" in both and "model.n_embd: the config says 64" in both
    assert "lmtrain downloads nothing" in refused("model.init_from=openai-community/gpt2")
    (tmp_path / "good" / "config.json").write_text("{not json")
    assert "config.json is not readable JSON" in refused(good)


@pytest.mark.slow
def test_what_cannot_be_exported_or_loaded_is_one_line_and_writes_nothing(tiny_run, tmp_path):
    config, run_dir = tiny_run
    train(load_config(config, ["model.pos_embedding=learned", "model.norm=rmsnorm", "model.mlp=swiglu",
                               "train.max_steps=2"]))
    result = run_cli("export", "--run", str(run_dir), "--format", "hf", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "learned+rmsnorm+swiglu has no exact counterpart" in result.stderr
    assert ("supported: rope+rmsnorm+swiglu (Llama, Mistral; with model.qkv_bias, Qwen2; with qk_norm, Qwen3), "
            "learned+layernorm+gelu|relu2 (GPT-2)") in result.stderr
    assert not (tmp_path / "out").exists()
    # A Hugging Face directory whose weights are not safetensors.
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2,
                                                 "n_positions": 32, "vocab_size": 300, "eos_token_id": 0}))
    shutil.copyfile(run_dir / "tokenizer" / "tokenizer.json", src / "tokenizer.json")
    (src / "model.safetensors").write_bytes(b"\x80\x04not safetensors")
    fresh = tmp_path / "fresh"
    shutil.copytree(run_dir / "tokenizer", fresh / "tokenizer")
    shutil.copytree(run_dir / "data", fresh / "data")
    before = sorted(p.relative_to(fresh) for p in fresh.rglob("*"))
    bad = run_cli("train", "--config", str(config), "--set", f"run.dir={fresh}", "--set", f"model.init_from={src}")
    assert bad.returncode == 2 and "model.safetensors is not a readable safetensors file" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    assert sorted(p.relative_to(fresh) for p in fresh.rglob("*")) == before


@pytest.mark.slow
def test_stablelm_with_biases_and_gguf_of_other_shapes_are_refused(tiny_run, tmp_path):
    from lmtrain.errors import LmtrainError

    config, run_dir = tiny_run
    trained(config, "stablelm", True, True, steps=2)
    with pytest.raises(LmtrainError, match="rope\\+layernorm\\+swiglu has no exact counterpart"):
        export(run_dir, "hf", tmp_path / "hf")
    train(load_config(config, ARCHS["starcoder2"] + ["train.max_steps=2"]), restart=True)
    with pytest.raises(LmtrainError, match="GGUF export writes the llama \\(Llama, Mistral\\), qwen2 and gpt2 architectures"):
        export(run_dir, "gguf", tmp_path / "m.gguf")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m.gguf").exists()
