"""train.activation_checkpointing: the same gradients as none, less saved for the backward pass,
the same parameter names; the memory estimate and the refusal of a run that cannot fit."""

from __future__ import annotations

import pytest
import torch

from lmtrain.config import load_config
from lmtrain.memory import apply_activation_checkpointing, estimate
from lmtrain.model import GPT, GPTConfig

VOCAB = 101


def tiny(mode: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, n_layer=3, n_head=2, n_embd=32, block_size=32, dropout=0.1,
                          pos_embedding="rope", norm="rmsnorm", mlp="swiglu"))
    apply_activation_checkpointing(model, mode)
    return model.train()


def gradients(model: GPT, x: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # dropout masks: recomputation must replay the same ones
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def saved_bytes(model: GPT, x: torch.Tensor) -> int:
    """Bytes the autograd graph holds for the backward pass after the forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x[:, :-1], x[:, 1:])
    return total


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_gives_the_same_gradients_and_names(mode):
    x = torch.randint(0, VOCAB, (4, 33))
    plain, checkpointed = tiny("none"), tiny(mode)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())  # checkpoints and exports unchanged
    expected, got = gradients(plain, x), gradients(checkpointed, x)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_checkpointing_saves_less_for_the_backward_pass():
    """What the autograd graph holds outside the checkpointed blocks: with full (and selective)
    checkpointing only the blocks' inputs and what lies outside them. (Selective's kept matmul
    outputs live inside the checkpoint's own storage, which this cannot see.)"""
    x = torch.randint(0, VOCAB, (8, 33))
    none, full = saved_bytes(tiny("none"), x), saved_bytes(tiny("full"), x)
    assert full < none / 4


@pytest.mark.slow
def test_the_estimate_adds_up_and_refuses_what_cannot_fit(tiny_run):
    from lmtrain.errors import ConfigError
    from lmtrain.train import train

    gpt2 = load_config("configs/gpt2-small.yaml")
    est = estimate(gpt2, 50257, torch.bfloat16)
    assert 123e6 < est.parameters < 125e6
    assert est.weights == est.gradients == 4 * est.parameters and est.optimizer == 8 * est.parameters
    # The blocks' share (the logits lie outside them): full checkpointing keeps a fraction of it.
    blocks = estimate(gpt2, 50257, torch.bfloat16, chunked_loss=True)
    full = estimate(load_config("configs/gpt2-small.yaml", ["train.activation_checkpointing=full"]), 50257,
                    torch.bfloat16, chunked_loss=True)
    assert full.activations < blocks.activations / 3
    muon = estimate(load_config("configs/gpt2-small.yaml", ["train.optimizer=muon"]), 50257, torch.bfloat16)
    assert muon.optimizer < est.optimizer
    # FSDP: an eighth of the optimiser state per rank; weights and gradients an eighth plus what is
    # gathered whole (the embeddings and head, two blocks); the activations do not shrink.
    ddp = estimate(load_config("configs/gpt2-xl.yaml"), 50257, torch.bfloat16, 8)
    fsdp = estimate(load_config("configs/gpt2-xl.yaml", ["train.parallel=fsdp"]), 50257, torch.bfloat16, 8)
    assert fsdp.optimizer == -(-ddp.optimizer // 8) and fsdp.activations == ddp.activations
    assert 4 * fsdp.parameters / 8 < fsdp.weights < 4 * fsdp.parameters / 4
    assert fsdp.total < ddp.total - 20 * 1024 ** 3
    config, run_dir = tiny_run
    with pytest.raises(ConfigError, match=r"this run needs ~.* GB per device.*lower train.batch_size"):
        train(load_config(config, ["train.batch_size=200000000"]))
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "config.yaml").exists()


def test_the_estimate_counts_what_dropout_keeps_for_the_backward_pass():
    """With ``model.dropout`` the masks, and on a CPU attention's T x T probabilities (outside the
    fused kernel), are kept for the backward pass: the estimate grows by about what autograd holds
    more (a run the small-corpus recipe gives dropout is checked against the memory it will use)."""
    shape = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=64", "train.batch_size=4"]

    def model(dropout: float) -> GPT:
        torch.manual_seed(0)
        config = load_config(None, shape + [f"model.dropout={dropout}"])
        model = GPT(GPTConfig.of(config.model, VOCAB)).train()
        model.drop_explicitly()  # as training on a CPU does (lmtrain.step)
        return model

    x = torch.randint(0, VOCAB, (4, 65))
    held = saved_bytes(model(0.1), x) - saved_bytes(model(0.0), x)
    counted = (estimate(load_config(None, shape + ["model.dropout=0.1"]), VOCAB, None, chunked_loss=True).activations
               - estimate(load_config(None, shape), VOCAB, None, chunked_loss=True).activations)
    assert held > 0 and 0.5 * held < counted < 2 * held
