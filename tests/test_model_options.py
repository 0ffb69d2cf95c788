"""The speedrun's architecture options (model.qk_norm, model.mlp: relu2, model.logit_softcap,
model.zero_init_proj, an untied head): shapes, a falling loss, cached decoding equal to a plain
forward pass, the chunked CPU loss equal to the standard one, FLOPs, and the export refusing what
transformers cannot represent."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmtrain.config import ModelConfig
from lmtrain.data import SyntheticBatches
from lmtrain.kvcache import KVCache
from lmtrain.loss import chunked_cross_entropy, chunked_eval_loss
from lmtrain.model import GPT, GPTConfig

VOCAB = 97
OPTIONS = {
    "qk_norm": {"qk_norm": True},
    "relu2": {"mlp": "relu2"},
    "softcap": {"logit_softcap": 5.0},
    "zero_init": {"zero_init_proj": True},
    "untied_zero_init": {"tie_embeddings": False, "zero_init_proj": True},
    "all_learned": {"qk_norm": True, "mlp": "relu2", "logit_softcap": 5.0, "zero_init_proj": True,
                    "tie_embeddings": False, "pos_embedding": "learned", "norm": "layernorm", "bias": True},
}


def tiny(**changes) -> GPT:
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=24, pos_embedding="rope", norm="rmsnorm", mlp="swiglu")
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, **{**base, **changes}))


@pytest.mark.parametrize("name", OPTIONS)
def test_shapes_and_a_falling_loss(name):
    model = tiny(**OPTIONS[name])
    x = torch.randint(0, VOCAB, (4, 24))
    logits, _ = model(x)
    assert logits.shape == (4, 24, VOCAB)
    if model.config.logit_softcap:
        assert logits.abs().max() < model.config.logit_softcap
    # Learn a fixed batch: the loss must fall well below its start.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        _, loss = model(x[:, :-1], x[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0, (first, loss.item())


@pytest.mark.parametrize("name", OPTIONS)
def test_cached_decoding_equals_a_plain_forward_pass(name):
    model = tiny(**OPTIONS[name]).eval()
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised projections would hide a cache bug
            p.add_(torch.randn_like(p) * 0.02)
        x = torch.randint(0, VOCAB, (2, 20))
        full, _ = model(x)
        cache = KVCache(model.config, 2, 24, torch.device("cpu"), torch.float32)
        steps = [model(x[:, :12], cache=cache)[0]]
        for t in range(12, 20):
            steps.append(model(x[:, t:t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 11:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_the_chunked_loss_equals_the_standard_one(softcap):
    model = tiny(logit_softcap=softcap, mlp="relu2", qk_norm=True)
    x = torch.randint(0, VOCAB, (3, 24))
    _, standard = model(x[:, :-1], x[:, 1:])
    standard.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _, chunked = model(x[:, :-1], x[:, 1:], loss_fn=chunked_cross_entropy)
    chunked.backward()
    torch.testing.assert_close(chunked, standard, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():  # the evaluation's chunked loss: the same value, no gradients
        _, evaluated = model(x[:, :-1], x[:, 1:], loss_fn=chunked_eval_loss)
    torch.testing.assert_close(evaluated, standard, atol=1e-5, rtol=1e-5)


def test_zero_init_starts_every_block_as_the_identity_and_uniform_logits():
    model = tiny(zero_init_proj=True, tie_embeddings=False)
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()
    assert not model.lm_head.weight.any()
    tied = tiny(zero_init_proj=True)
    assert tied.lm_head.weight is tied.wte.weight and tied.wte.weight.std() > 0.01  # the embedding is not zeroed


def test_flops_count_the_matmuls_each_option_has():
    gelu, relu2 = tiny(mlp="gelu"), tiny(mlp="relu2")
    assert relu2.flops_per_token() == gelu.flops_per_token()  # the same two 4x matrices
    plain, normed = tiny(), tiny(qk_norm=True)
    # qk_norm adds 2 x head_dim scales per layer, no matmul: 6 FLOPs per parameter as for every weight.
    assert normed.flops_per_token() - plain.flops_per_token() == 6 * 2 * 16 * 2
    assert tiny(logit_softcap=15.0).flops_per_token() == plain.flops_per_token()
    untied = tiny(tie_embeddings=False)
    assert untied.flops_per_token() == plain.flops_per_token()  # the head is a matmul either way


@pytest.mark.parametrize("option, expected", [
    ({"qk_norm": True}, "qwen3"),
    ({"qk_norm": True, "bias": True}, "no exact counterpart"),
    ({"qk_norm": True, "norm": "layernorm"}, "no exact counterpart"),
    ({"logit_softcap": 15.0}, "no exact counterpart"),
    ({"mlp": "relu2"}, "no exact counterpart"),  # rope + rmsnorm + relu2: no such HF model
    ({"mlp": "relu2", "norm": "layernorm"}, "starcoder2"),
    ({"mlp": "relu2", "norm": "layernorm", "pos_embedding": "learned"}, "gpt2"),
    ({"zero_init_proj": True}, "llama"),  # an initialisation: nothing to represent
])
def test_which_options_export_and_which_are_refused(option, expected):
    from lmtrain.errors import ConfigError
    from lmtrain.hf_format import architecture_of

    config = dataclasses.replace(ModelConfig(pos_embedding="rope", norm="rmsnorm", mlp="swiglu"), **option)
    if expected == "no exact counterpart":
        with pytest.raises(ConfigError, match="no exact counterpart"):
            architecture_of(config)
    else:
        assert architecture_of(config) == expected


def test_synthetic_step_with_every_option_on_muon():
    from lmtrain.config import load_config
    from lmtrain.step import build_training

    cfg = load_config(None, ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16",
                             "train.batch_size=4", "train.optimizer=muon", "model.qk_norm=true", "model.mlp=relu2",
                             "model.logit_softcap=10", "model.zero_init_proj=true", "model.tie_embeddings=false",
                             "train.warmup_steps=1"])
    training = build_training(cfg, VOCAB, torch.device("cpu"), "fp32")
    batches = SyntheticBatches(VOCAB, 4, 16, torch.device("cpu"))
    for step in range(3):
        loss, norm, applied = training.runner.run(step, batches, lr=1e-3)
        assert applied and torch.isfinite(loss)
    muon_params = {id(p) for g in training.optimizer.muon.param_groups for p in g["params"]}
    for name, p in training.model.named_parameters():
        in_muon = id(p) in muon_params
        assert in_muon == (name.startswith("blocks.") and p.dim() == 2), name
