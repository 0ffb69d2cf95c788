"""The GPT: shapes, causality, parameter counts, every architecture option trains, cache = no cache."""

from __future__ import annotations

import itertools

import pytest
import torch

from lmtrain.config import load_config
from lmtrain.errors import ConfigError
from lmtrain.kvcache import KVCache
from lmtrain.model import GPT, GPTConfig, attention_with_dropout, dropout
from lmtrain.step import build_training

VARIANTS = list(itertools.product(["learned", "rope"], ["layernorm", "rmsnorm"], ["gelu", "swiglu"]))


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    base = dict(vocab_size=301, n_layer=2, n_head=2, n_embd=32, block_size=16)
    base.update(kw)
    return GPT(GPTConfig(**base))


def test_logits_cover_the_real_vocab_only():
    model = tiny()
    assert model.wte.weight.shape[0] == 320  # padded to a multiple of 64
    with torch.no_grad():
        logits, loss = model(torch.randint(0, 301, (3, 16)), torch.randint(0, 301, (3, 16)))
    assert logits.shape == (3, 16, 301)
    assert loss.shape == () and torch.isfinite(loss)


@pytest.mark.parametrize("pos, norm, mlp", VARIANTS)
def test_future_tokens_never_change_past_logits(pos, norm, mlp):
    model = tiny(pos_embedding=pos, norm=norm, mlp=mlp).eval()
    idx = torch.randint(0, 301, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, 301, (2, 6))
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.equal(a[:, 10:], b[:, 10:])


def test_parameter_counts_tied_and_untied():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    unique = sum(p.numel() for p in {id(p): p for p in tied.parameters()}.values())
    assert tied.num_params() == unique
    assert untied.num_params() - tied.num_params() == 320 * 32
    wte, wpe = 320 * 32, 16 * 32
    assert tied.num_params(embeddings=False) == tied.num_params() - wte - wpe
    # 6N + attention, N counting the LM head matmul once.
    n = tied.num_params(embeddings=False) + wte
    assert tied.flops_per_token() == 6 * n + 12 * 2 * 32 * 16


@pytest.mark.parametrize("pos, norm, mlp", VARIANTS)
def test_every_variant_learns(pos, norm, mlp):
    model = tiny(pos_embedding=pos, norm=norm, mlp=mlp, bias=True)
    data = torch.randint(0, 301, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_kv_cache_matches_full_recomputation(pos, static):
    model = tiny(pos_embedding=pos).eval()
    idx = torch.randint(0, 301, (2, 12))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, 16, "cpu", torch.float32, static=static)
    prefix, _ = model(idx[:, :5], cache=cache)
    torch.testing.assert_close(prefix[:, -1], full[:, 4])
    chunk, _ = model(idx[:, 5:8], cache=cache)  # several new positions at once, with a past
    torch.testing.assert_close(chunk[:, -1], full[:, 7])
    for t in range(8, 12):
        step, _ = model(idx[:, t:t + 1], cache=cache)
        torch.testing.assert_close(step[:, -1], full[:, t], rtol=1e-5, atol=1e-5)


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("overrides, message", [
    (["model.n_embd=100", "model.n_head=3"], "model.n_embd (100) must be divisible by model.n_head (3)"),
    (["model.n_embd=96", "model.n_head=32", "model.pos_embedding=rope"], "rope needs an even head size"),
    (["model.mlp=relu"], "model.mlp: must be one of 'gelu', 'swiglu'"),
    (["train.min_lr=0.1", "train.lr=0.01"], "train.min_lr (0.1) must not exceed train.lr (0.01)"),
    (["train.lr=5"], "train.lr: must be > 0.0 and <= 1.0, got 5"),
    (["train.batch_size=0"], "train.batch_size: must be >= 1, got 0"),
])
def test_invalid_shapes_are_config_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_equals_the_standard_loss_and_gradients(tie, monkeypatch):
    from lmtrain import loss as loss_module

    monkeypatch.setattr(loss_module, "CE_CHUNK_ELEMENTS", 301 * 7)  # several chunks, a ragged last one
    monkeypatch.setattr(loss_module, "CE_MIN_CHUNK_ROWS", 5)
    model = tiny(tie_embeddings=tie)
    idx, targets = torch.randint(0, 301, (3, 16)), torch.randint(0, 301, (3, 16))
    logits_none, fused = model(idx, targets, loss_fn=loss_module.training_loss_fn(torch.device("cpu")))
    assert logits_none is None
    fused.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, _ = model.eval()(idx)  # the standard head
    standard = torch.nn.functional.cross_entropy(logits.reshape(-1, 301), targets.reshape(-1))
    standard.backward()
    torch.testing.assert_close(fused, standard, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_cpu_dropout_drops_at_its_rate_keeps_the_mean_and_replays_from_the_seed():
    """The CPU's dropout (four 16-bit lanes per 64-bit draw, not ``bernoulli_``) is dropout: each
    element zeroed with probability p, the rest scaled so the mean is kept, the same masks from
    the same seed (an exact resume restores the generator and must redraw them)."""
    ones = torch.ones(400_000)
    for p in (0.1, 0.5):
        torch.manual_seed(0)
        out = dropout(ones, p)
        assert abs(float((out == 0).float().mean()) - p) < 0.005
        assert float(out.mean()) == pytest.approx(1.0, abs=0.01)
        torch.manual_seed(0)
        assert torch.equal(dropout(ones, p), out) and not torch.equal(dropout(ones, p), out)
    odd = torch.ones(3, 5, 7)  # a size that is not a multiple of four lanes
    assert dropout(odd, 0.1).shape == odd.shape


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_with_dropout_is_pytorchs_attention_when_nothing_is_dropped(kv_heads):
    """Written out for the CPU's dropout, it is the same causal attention as
    ``scaled_dot_product_attention`` (grouped-query included), values and gradients."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 9, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ours = attention_with_dropout(q, k, v, 0.0)
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != 4)
    assert torch.allclose(ours, theirs)
    grads = [torch.autograd.grad(out.square().sum(), (q, k, v)) for out in (ours, theirs)]
    assert all(torch.allclose(a, b) for a, b in zip(*grads))


def test_attention_dropout_is_unbiased_and_a_training_model_uses_it():
    """Averaged over many masks, attention with dropout gives attention without it; a model in
    training mode draws new masks each call, in eval mode none."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(4000, 1, 6, 4) for _ in range(3))
    q, k, v = q[:1].expand_as(q), k[:1].expand_as(k), v[:1].expand_as(v)  # one input, 4,000 masks
    mean = attention_with_dropout(q, k, v, 0.2).mean(0)
    exact = torch.nn.functional.scaled_dot_product_attention(q[:1], k[:1], v[:1], is_causal=True)[0]
    assert torch.allclose(mean, exact, atol=0.05)
    model = tiny(dropout=0.1, pos_embedding="rope", norm="rmsnorm", mlp="swiglu")
    model.drop_explicitly()
    idx = torch.randint(0, 301, (2, 16))
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
    # training on a CPU takes this path (lmtrain.step); a model built by hand has PyTorch's
    built = build_training(load_config(None, ["model.dropout=0.1", "model.n_layer=1"]), 301, torch.device("cpu"), "fp32")
    assert all(m.explicit for m in built.model.modules() if hasattr(m, "explicit"))
    assert not any(m.explicit for m in tiny(dropout=0.1).modules() if hasattr(m, "explicit"))
