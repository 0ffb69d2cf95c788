"""Real models in: tiny models with random weights, built from each family's real config shrunk to
two layers (head ratios, epsilons, head sizes, biases, rope scaling, tied or not kept), load
through ``model.init_from`` and compute transformers' logits; fine-tuned, they resume exactly and
export back to their own class and to GGUF."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY_TRAIN, write_config
from lmtrain.config import load_config
from lmtrain.model import GPT, GPTConfig
from lmtrain.pretrained import open_source
from lmtrain.restore import Pretrained
from lmtrain.rundir import fork_run

transformers = pytest.importorskip("transformers")

# Each a real model's config, shrunk: the ratios and options that make it that model kept.
FAMILIES = {
    # SmolLM2-135M: 9 heads over 3 key/value heads, eps 1e-5, theta 1e5, tied, its own MLP width.
    "smollm2": lambda **kw: transformers.LlamaConfig(**kw,
        hidden_size=72, intermediate_size=192, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True),
    # Llama 3.2-1B: 4:1 grouped-query attention, an explicit head size, llama3 rope scaling, tied.
    "llama3.2": lambda **kw: transformers.LlamaConfig(**kw,
        hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}),
    # TinyLlama: multi-query-like 8:1 ratio (here 4:1), untied head.
    "tinyllama": lambda **kw: transformers.LlamaConfig(**kw,
        hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5,
        tie_word_embeddings=False),
    "mistral": lambda **kw: transformers.MistralConfig(**kw,
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
        tie_word_embeddings=False),
    # Qwen2.5: biases on q, k and v only, theta 1e6, a config vocabulary larger than the tokenizer's.
    "qwen2.5": lambda **kw: transformers.Qwen2Config(**kw,
        hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_theta=1e6, tie_word_embeddings=True),
    # Qwen3: q/k norms and a head size of its own (4 x 32 against a width of 64).
    "qwen3": lambda **kw: transformers.Qwen3Config(**kw,
        hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True),
    "gpt2": lambda **kw: transformers.GPT2Config(n_embd=64, n_head=4, n_positions=64, n_layer=2, vocab_size=300,
                                                 eos_token_id=0, bos_token_id=0),
}
CLASSES = {"smollm2": "LlamaForCausalLM", "llama3.2": "LlamaForCausalLM", "tinyllama": "LlamaForCausalLM",
           "mistral": "MistralForCausalLM", "qwen2.5": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "gpt2": "GPT2LMHeadModel"}


def make_source(directory: Path, family: str, tokenizer: Path, vocab: int = 320):
    """A Hugging Face directory of ``family`` with random weights (norms too: nothing is left at a
    value that would hide a mistake) and the run's tokenizer."""
    common = {} if family == "gpt2" else {"vocab_size": vocab, "num_hidden_layers": 2, "max_position_embeddings": 64,
                                          "eos_token_id": 0, "bos_token_id": 0}
    config = FAMILIES[family](**common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)
    shutil.copyfile(tokenizer, directory / "tokenizer.json")
    return model


def lmtrain_model(directory: Path) -> GPT:
    source = open_source(str(directory))
    model = GPT(GPTConfig(**source.fields))
    Pretrained(source).weights(model)
    return model.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lmtrain_computes_transformers_logits_and_exports_back(family, prepared_run, tmp_path):
    from lmtrain.hf_format import hf_config, to_hf

    source_run, _ = prepared_run
    theirs = make_source(tmp_path / "src", family, source_run / "tokenizer" / "tokenizer.json")
    ours = lmtrain_model(tmp_path / "src")
    assert ours.config.hf_class == CLASSES[family]
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(ids).logits
        logits, _ = ours(ids)
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    # Greedy decoding with the KV cache (key/value heads only) gives transformers' tokens.
    from lmtrain.generate import SamplingParams, generate

    prompt = ids[:1, :8]
    with torch.no_grad():
        ref = theirs.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        out = torch.cat(list(generate(ours, prompt, 16, SamplingParams(temperature=0.0), None)), dim=1)
    assert out[0].tolist() == ref[0, 8:].tolist()
    # Back to its own class: the same tensors, a config transformers rebuilds the model from.
    state = to_hf(ours.state_dict(), ours.config)
    reference = {k: v for k, v in theirs.state_dict().items() if "rotary" not in k and "masked_bias" not in k
                 and not k.endswith(".attn.bias")}
    if ours.config.tie_embeddings:
        reference.pop("lm_head.weight", None)
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    fields = hf_config(ours.config, 0)
    assert fields["architectures"] == [CLASSES[family]]
    rebuilt = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**fields)).eval()
    rebuilt.load_state_dict(state, strict=False)
    if ours.config.tie_embeddings:
        rebuilt.tie_weights()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, expected, atol=1e-5, rtol=0)


def test_what_a_source_holds_is_refused_in_one_line_when_lmtrain_would_approximate_it(prepared_run, tmp_path):
    from lmtrain.errors import ConfigError

    source_run, _ = prepared_run
    make_source(tmp_path / "src", "mistral", source_run / "tokenizer" / "tokenizer.json")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    for change, expected in [({"sliding_window": 16}, "a sliding window of 16 tokens, shorter than the context"),
                             ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling of type 'yarn'"),
                             ({"model_type": "gemma"}, "model_type 'gemma' is not supported"),
                             ({"hidden_act": "gelu"}, "hidden_act 'gelu'")]:
        (tmp_path / "src" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConfigError, match=expected):
            open_source(str(tmp_path / "src"))
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    (tmp_path / "src" / "model.safetensors").rename(tmp_path / "src" / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="only safetensors weights are read; pytorch_model.bin is a pickle"):
        open_source(str(tmp_path / "src"))


@pytest.mark.slow
@pytest.mark.parametrize("family, lora", [("qwen2.5", False), ("smollm2", False), ("smollm2", True)])
def test_a_fine_tune_of_a_real_shape_resumes_exactly_and_exports(family, lora, prepared_run, tmp_path, monkeypatch):
    """From the embedded default config plus the keys a user gives: the architecture is the
    source's, AdamW at a fine-tuning rate is chosen; a SIGTERM and resume end bit-identical to an
    uninterrupted run; the export is the source's class with transformers' logits; GGUF keeps
    every tensor (k permuted by the key/value heads for llama.cpp's llama)."""
    from safetensors.torch import load_file

    from lmtrain.export import export, read_gguf
    from lmtrain.prepare import build_shards, train_tokenizer
    from lmtrain.train import train
    from test_train import interrupted_at

    source_run, corpus = prepared_run
    make_source(tmp_path / "src", family, source_run / "tokenizer" / "tokenizer.json", vocab=300)
    sets = [f"model.init_from={tmp_path / 'src'}", f"data.source={corpus}", "data.val_fraction=0.15",
            "model.block_size=32", "train.max_steps=6", "train.batch_size=4", "train.checkpoint_every=3",
            "train.eval_every=3", "train.eval_batches=1", "train.warmup_steps=2"] + (["train.lora_rank=4"] if lora else [])
    run = tmp_path / "run"
    cfg = load_config(None, sets + [f"run.dir={run}"])
    train_tokenizer(cfg)
    build_shards(cfg)
    interrupted_at(4, cfg, monkeypatch)
    resumed = train(load_config(None, sets + [f"run.dir={run}"]))
    straight_dir = fork_run(run, tmp_path / "straight")
    straight = train(load_config(None, sets + [f"run.dir={straight_dir}"]))
    ours, plain = load_file(str(resumed.checkpoint / "model.safetensors")), load_file(str(straight.checkpoint / "model.safetensors"))
    assert all(torch.equal(ours[k], plain[k]) for k in plain)
    saved = json.loads((resumed.checkpoint / "state.json").read_text())["config"]
    assert saved["train"]["optimizer"] == "adamw"  # chosen, not the default's Muon
    assert saved["train"]["lr"] == (2e-4 if lora else 5e-5)
    assert saved["model"]["hf_class"] == CLASSES[family] and saved["model"]["block_size"] == 32
    export(run, "hf", tmp_path / "hf")
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["architectures"] == [CLASSES[family]]
    assert exported["max_position_embeddings"] == 64  # the source's context, not the 32-token training windows
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    from lmtrain.inference import load_model

    loaded = load_model(run)
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids)[0], hf(ids).logits, atol=1e-5, rtol=0)
    if lora:  # the adapters as peft loads them on the source itself
        peft = pytest.importorskip("peft")
        export(run, "peft", tmp_path / "adapter")
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        with torch.no_grad():
            torch.testing.assert_close(adapted(ids).logits, loaded.model(ids)[0], atol=1e-5, rtol=0)
    export(run, "gguf", tmp_path / "m.gguf")
    state, _ = read_gguf(tmp_path / "m.gguf", loaded.model.config)
    full = loaded.model.state_dict()
    assert all(torch.equal(value, full[key][: value.shape[0]]) for key, value in state.items())
    # The GGUF file as a source: its config from the metadata, its tokenizer rebuilt, the same logits.
    from_gguf = lmtrain_model(tmp_path / "m.gguf")
    assert from_gguf.config.hf_class == (CLASSES[family] if family != "smollm2" else "LlamaForCausalLM")
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(ids)[0], loaded.model(ids)[0], atol=1e-4, rtol=0)
    source = open_source(str(tmp_path / "m.gguf"))
    from tokenizers import Tokenizer

    text = "def alpha(beta):\n    return beta + 1\n"
    assert (Tokenizer.from_file(str(source.tokenizer_file)).encode(text).ids
            == Tokenizer.from_file(str(run / "tokenizer" / "tokenizer.json")).encode(text).ids)


@pytest.mark.parametrize("family", ["smollm2", "qwen3"])
def test_sample_and_eval_read_a_model_as_it_is(family, prepared_run, tmp_path, monkeypatch):
    """``--model DIR``: greedy text equals transformers' generate, and the loss on a text equals
    transformers' mean loss over the same token windows."""
    import torch.nn.functional as F
    from tokenizers import Tokenizer
    from typer.testing import CliRunner

    from lmtrain.cli import app

    source_run, _ = prepared_run
    theirs = make_source(tmp_path / "src", family, source_run / "tokenizer" / "tokenizer.json")
    tokenizer = Tokenizer.from_file(str(tmp_path / "src" / "tokenizer.json"))
    prompt = "def alpha(beta):\n    return"
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    with torch.no_grad():
        expected = theirs.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    runner = CliRunner()
    result = runner.invoke(app, ["sample", "--model", str(tmp_path / "src"), "--prompt", prompt, "--greedy", "-n", "12"])
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n") == prompt + tokenizer.decode(expected[0, ids.size(1):].tolist())
    text = tmp_path / "mine.txt"
    text.write_text("class Point:\n    def __init__(self, x):\n        self.x = x\n" * 3)
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "src"), "--data", str(text), "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    stream = tokenizer.encode(text.read_text()).ids + [0]  # the document, then its end-of-text
    block = 64
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, block):
            window = torch.tensor([stream[start:start + block + 1]])
            logits = theirs(window[:, :-1]).logits
            total += F.cross_entropy(logits[0].double(), window[0, 1:], reduction="sum").item()
            count += window.size(1) - 1
    assert scored["tokens"] == count and scored["loss"] == pytest.approx(total / count, abs=1e-5)
    refused = runner.invoke(app, ["eval", "--model", str(tmp_path / "src")])
    assert refused.exit_code == 2 and "has no val split; give --data" in refused.stderr


def sentencepiece_style_tokenizer(corpus: Path, path: Path) -> None:
    """A TinyLlama/Mistral-style tokenizer.json: BPE over '▁'-joined text with byte fallback,
    <unk> <s> </s>, and a post-processor that puts <s> before every text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  show_progress=False)
    tokenizer.train([str(p) for p in sorted(corpus.glob("*.txt"))], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(path))


@pytest.mark.slow
def test_a_byte_fallback_tokenizer_with_bos_is_used_as_it_ships(prepared_run, tmp_path):
    """TinyLlama-style: the source's tokenizer as it is (SentencePiece-style BPE, byte fallback),
    with its BOS before every document in the shards, every prompt, every scored text, as
    transformers' tokenizer applies it; its files go back with the export."""
    from tokenizers import Tokenizer
    from typer.testing import CliRunner

    import torch.nn.functional as F
    from lmtrain.cli import app
    from lmtrain.prepare import build_shards, train_tokenizer
    from lmtrain.shards import open_split

    source_run, corpus = prepared_run
    src = tmp_path / "src"
    make_source(src, "tinyllama", source_run / "tokenizer" / "tokenizer.json", vocab=600)
    sentencepiece_style_tokenizer(corpus, src / "tokenizer.json")
    hf_config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**hf_config, "eos_token_id": 2, "bos_token_id": 1}))
    (src / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>",
                                                           "eos_token": "</s>", "chat_template": "{{ messages }}"}))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    text = tmp_path / "t.txt"
    text.write_text("for item in range(10):\n    print(item, 'é ✓')\n")
    ids = tokenizer.encode(text.read_text()).ids + [2]  # <s> ... </s>, as transformers gives them
    assert ids[0] == 1
    result = CliRunner().invoke(app, ["eval", "--model", str(src), "--data", str(text), "--json"])
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        logits = theirs(torch.tensor([ids[:-1]])).logits[0]
    expected = F.cross_entropy(logits.double(), torch.tensor(ids[1:])).item()
    assert json.loads(result.stdout)["loss"] == pytest.approx(expected, abs=1e-5)
    # A fine-tuning run's shards: every document starts with <s> and ends with </s>.
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", f"model.init_from={src}", f"data.source={corpus}",
                             "data.val_fraction=0.15", "model.block_size=32"])
    train_tokenizer(cfg)
    build_shards(cfg)
    stream = open_split(tmp_path / "run" / "data", "train")[0]
    starts = [i + 1 for i in range(len(stream) - 1) if stream[i] == 2]
    assert stream[0] == 1 and all(stream[i] == 1 for i in starts)
    assert (tmp_path / "run" / "tokenizer" / "tokenizer_config.json").is_file()


def test_a_large_vocabulary_stays_out_of_muon_and_out_of_the_cpu_logits():
    """Real vocabularies are 49k-152k tokens: the embedding and head train with AdamW (Muon takes
    only the blocks' matrices), and on a CPU the chunked loss never holds all the logits (the memory
    estimate counts them whole only where they are materialised)."""
    import torch.nn.functional as F

    from lmtrain.loss import chunked_cross_entropy
    from lmtrain.memory import estimate
    from lmtrain.optim import muon_matrices

    config = load_config(None, ["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.n_kv_head=2",
                                "model.block_size=64", "train.optimizer=muon", "train.batch_size=2"])
    model = GPT(GPTConfig.of(config.model, 49152))
    muon = {id(p) for p in muon_matrices(model)}
    assert id(model.wte.weight) not in muon and id(model.lm_head.weight) not in muon
    assert all(id(p) in muon for block in model.blocks for p in block.parameters() if p.dim() == 2)
    x = torch.randint(0, 49152, (2, 64))
    hidden = model.hidden_states(x)
    expected = F.cross_entropy(model.logits(hidden).reshape(-1, 49152).float(), x.reshape(-1))
    chunked = chunked_cross_entropy(hidden.reshape(-1, 64), model.lm_head.weight, x.reshape(-1), 49152, 0.0)
    torch.testing.assert_close(chunked, expected, atol=1e-5, rtol=1e-5)
    whole, pieces = estimate(config, 49152, None), estimate(config, 49152, None, chunked_loss=True)
    vocab, tokens = model.config.padded_vocab_size, 2 * 64
    # Materialised: every token's logits, their fp32 log-probabilities and gradient. Chunked: one
    # chunk's logits and softmax (here all 128 tokens fit one chunk) and the head's gradient.
    assert whole.activations - pieces.activations == tokens * vocab * 12 - (tokens * vocab * 8 + 4 * vocab * 64)
