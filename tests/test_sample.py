"""Sampling: cache equals no cache, top-k 1 is greedy, seeds reproduce, stops, stdin, UTF-8 streaming."""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from lmtrain.config import load_config
from lmtrain.errors import CheckpointError, ConfigError, LmtrainError
from lmtrain.generate import Decoder, SamplingParams, draw, generate, generate_uncached
from lmtrain.kvcache import KVCache
from lmtrain.model import GPT, GPTConfig
from lmtrain.sample import SampleOptions, TextStream, sample
from lmtrain.train import train


@pytest.fixture
def trained(tiny_run):
    config, run_dir = tiny_run
    train(load_config(config, ["train.max_steps=10", "model.pos_embedding=rope"]))
    return config, run_dir


GREEDY = SamplingParams(temperature=0.0)


def tiny_model_and_prompt(pos: str, block_size: int, device: str = "cpu"):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=301, n_layer=2, n_head=2, n_embd=32, block_size=block_size,
                          pos_embedding=pos)).to(device).eval()
    return model, torch.randint(0, 301, (2, 5)).to(device)


def tokens(loop, model, prompt, n, **kw) -> torch.Tensor:
    return torch.cat(list(loop(model, prompt, n, GREEDY, **kw)), dim=1)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_cached_greedy_equals_uncached(pos):
    model, prompt = tiny_model_and_prompt(pos, block_size=64)
    assert torch.equal(tokens(generate, model, prompt, 50), tokens(generate_uncached, model, prompt, 50))


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_static_cache_decoding_equals_uncached(pos):
    # The static cache is what the CUDA graph decoder replays; run eagerly here, it must give
    # the reference tokens too, across a slide past block_size.
    model, prompt = tiny_model_and_prompt(pos, block_size=32)
    decoder = Decoder(model, 2, cuda_graph=False)
    decoder.cache = KVCache(model.config, 2, 32, "cpu", torch.float32, static=True)
    cached = tokens(generate, model, prompt, 60, decoder=decoder)
    uncached = tokens(generate_uncached, model, prompt, 60)
    assert torch.equal(cached[:, :27], uncached[:, :27])  # the loops crop differently past block_size
    assert torch.equal(tokens(generate, model, prompt, 60, decoder=decoder), cached)  # a decoder is reusable


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_past_the_context_the_cached_loop_keeps_three_quarters_of_the_window(pos):
    # What holds past block_size: each token of the cached loop is what the model predicts from
    # the last `seen` tokens, where `seen` grows to the whole window (32), then drops to 24 (the
    # slide keeps three quarters) and grows again: never less than 3/4 of a window once full.
    model, prompt = tiny_model_and_prompt(pos, block_size=32)
    cached = tokens(generate, model, prompt, 70)
    sequence = torch.cat([prompt, cached], dim=1)
    seen, slides = prompt.size(1), 0
    for i in range(cached.size(1)):
        end = prompt.size(1) + i
        logits, _ = model(sequence[:, end - seen:end])
        assert torch.equal(logits[:, -1].argmax(dim=-1), cached[:, i]), i
        if seen == 32:
            seen, slides = 24, slides + 1
        else:
            seen += 1
    assert slides == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_cuda_graph_decoding_equals_eager(pos):
    model, prompt = tiny_model_and_prompt(pos, block_size=32, device="cuda")
    graphed = Decoder(model, 2, cuda_graph=True)
    eager = Decoder(model, 2, cuda_graph=False)
    for _ in range(2):  # the second run replays the same captured graph
        assert torch.equal(tokens(generate, model, prompt, 60, decoder=graphed),
                           tokens(generate, model, prompt, 60, decoder=eager))


def test_draw_follows_the_probabilities_and_never_picks_a_zero():
    # Inverse-CDF sampling: zero-probability categories first, between and last are never drawn
    # (top-k and top-p zero out categories), the others at their rates; rows are independent.
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
    draws = torch.cat([draw(probs, g) for _ in range(20000)], dim=1)
    counts = torch.stack([torch.bincount(row, minlength=6) for row in draws]).float() / 20000
    assert counts[0, [0, 2, 5]].sum() == 0 and counts[1, 4] == 1
    assert torch.allclose(counts[0], probs[0], atol=0.015)


def test_ahead_of_time_compiled_step_equals_eager_decoding():
    # On a CPU `compile=True` exports the step and builds it with AOTInductor; learned positions
    # here (the CLI test below covers RoPE), across a slide, twice through the same library.
    model, prompt = tiny_model_and_prompt("learned", block_size=32)
    compiled = Decoder(model, 2, compile=True)
    assert compiled.compiled_step is not None
    eager = tokens(generate, model, prompt, 60)
    for _ in range(2):
        assert torch.equal(tokens(generate, model, prompt, 60, decoder=compiled), eager)
    with pytest.raises(ValueError, match=r"steps \(2, 1\) tokens"):
        compiled.step(torch.zeros((1, 1), dtype=torch.long))  # the library would read out of bounds


@pytest.mark.slow
def test_generation_past_the_context_slides(trained):
    _, run_dir = trained
    stats = sample(run_dir, SampleOptions(max_new_tokens=100, greedy=True, prompt="def"))
    assert stats.tokens > 32  # block_size is 32


def collect(run_dir, **kw):
    pieces = []
    stats = sample(run_dir, SampleOptions(**kw), on_text=lambda i, piece: pieces.append(piece))
    assert "".join(pieces) == "".join(stats.samples)
    return stats.samples


@pytest.mark.slow
def test_run_level_cache_matches_no_cache(trained):
    _, run_dir = trained
    with_cache = collect(run_dir, prompt="for ", greedy=True, max_new_tokens=20)
    without = collect(run_dir, prompt="for ", greedy=True, max_new_tokens=20, use_cache=False)
    assert with_cache == without


@pytest.mark.slow
def test_compiled_step_gives_the_same_text(trained):
    # `--compile` runs the one-token step compiled over a static cache; 60 tokens on
    # a 32-token context cover the slide too.
    _, run_dir = trained
    args = ("sample", "--run", str(run_dir), "--prompt", "def ", "--greedy", "-n", "60")
    eager, compiled = run_cli(*args), run_cli(*args, "--compile")
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout


@pytest.mark.slow
def test_compile_without_a_compiler_is_one_clear_line(trained):
    _, run_dir = trained
    result = run_cli("sample", "--run", str(run_dir), "--compile", "-n", "5",
                     env={"CXX": "/nonexistent/g++", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"})
    assert result.returncode == 2
    assert "--compile could not build the decoding step" in result.stderr
    assert "sample without --compile" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_top_k_1_is_greedy_and_seeds_reproduce(trained):
    _, run_dir = trained
    greedy = collect(run_dir, prompt="x = ", greedy=True, max_new_tokens=15)
    top1 = collect(run_dir, prompt="x = ", top_k=1, temperature=1.0, max_new_tokens=15, seed=5)
    assert greedy == top1
    a = collect(run_dir, prompt="x = ", temperature=1.0, max_new_tokens=30, seed=1, num_samples=2)
    b = collect(run_dir, prompt="x = ", temperature=1.0, max_new_tokens=30, seed=1, num_samples=2)
    c = collect(run_dir, prompt="x = ", temperature=1.0, max_new_tokens=30, seed=2, num_samples=2)
    assert a == b and a != c and len(a) == 2


@pytest.mark.slow
def test_stop_strings_cut_before_the_stop(trained):
    _, run_dir = trained
    free = collect(run_dir, prompt="def ", greedy=True, max_new_tokens=40)[0]
    assert len(free) > 4
    stop = free[2:4]
    stopped = collect(run_dir, prompt="def ", greedy=True, max_new_tokens=40, stop=[stop])[0]
    assert stopped == free[: free.find(stop)]


def test_utf8_streaming_never_splits_characters(prepared_run):
    from lmtrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(prepared_run[0])  # 300 tokens: non-ASCII stays byte by byte
    text = "a🐍é中\u0301z"
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    pieces = []
    stream = TextStream(tokenizer, [], pieces.append)
    for i in ids:
        stream.add(i)
    assert stream.finish() == text
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_streamed_text_equals_decoding_everything_at_once(prepared_run):
    # The stream decodes only the tokens since the last whole character; on any sequence of
    # ids, even invalid UTF-8 byte runs, what it emits must equal one decode of all of them.
    from lmtrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(prepared_run[0])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, tokenizer.get_vocab_size(), (200,), generator=g).tolist()
        pieces = []
        stream = TextStream(tokenizer, [], pieces.append)
        for i in ids:
            stream.add(i)
        whole = tokenizer.decode(ids, skip_special_tokens=False)
        assert stream.finish() == whole and "".join(pieces) == whole


@pytest.mark.slow
def test_errors(tiny_run, trained):
    _, run_dir = trained
    with pytest.raises(ConfigError, match=r"--top-p must be in \(0, 1\]"):
        sample(run_dir, SampleOptions(top_p=1.5))
    with pytest.raises(ConfigError, match="--temperature must be >= 0"):
        sample(run_dir, SampleOptions(temperature=-1.0))
    with pytest.raises(CheckpointError, match="unknown checkpoint 'nope'"):
        sample(run_dir, SampleOptions(checkpoint="nope"))


@pytest.mark.slow
def test_long_prompt_with_learned_positions(tiny_run):
    config, run_dir = tiny_run
    train(load_config(config, ["train.max_steps=2"]))
    with pytest.raises(LmtrainError, match="with learned positions it must be shorter than the context"):
        sample(run_dir, SampleOptions(prompt="x = 1\n" * 200))


def test_no_checkpoint_says_train_first(tiny_run):
    config, run_dir = tiny_run
    (run_dir / "config.yaml").write_text(load_config(config).to_yaml())
    with pytest.raises(CheckpointError, match="train first"):
        sample(run_dir, SampleOptions())


@pytest.mark.slow
def test_checkpoint_that_disagrees_with_config(trained):
    config, run_dir = trained
    (run_dir / "config.yaml").write_text(load_config(config, ["model.n_embd=64"]).to_yaml())
    with pytest.raises(CheckpointError, match="model.n_embd: checkpoint 32, config 64"):
        sample(run_dir, SampleOptions())


@pytest.mark.slow
def test_cli_stdin_prompt_and_stats(trained):
    _, run_dir = trained
    result = run_cli("sample", "--run", str(run_dir), "--prompt", "-", "--greedy", "-n", "10", input="class ")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("class ")
    assert "tokens/s" in result.stderr
    bad = run_cli("sample", "--run", str(run_dir), "--top-p", "0")
    assert bad.returncode == 2 and "--top-p must be in (0, 1]" in bad.stderr and "Traceback" not in bad.stderr
