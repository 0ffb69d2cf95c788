"""The GPT: a decoder-only transformer in plain PyTorch, readable top to bottom.

    tokens -> token embedding (+ learned positions) -> n_layer x Block -> final norm -> LM head

    Block(x) = x + Attention(Norm(x))      causal self-attention, optionally with RoPE
             = x + MLP(Norm(x))            GELU 4x, or SwiGLU

Choices are config keys (``model.*``, declared once in ``lmtrain.config.ArchitectureConfig``): learned or
rotary positions, LayerNorm or RMSNorm, GELU or SwiGLU, tied or separate input/output embeddings.
To add an architecture option, add its field to ``ModelConfig`` and use it here. The embedding
table is padded to a multiple of 64 rows because matmuls with such shapes are markedly faster on
GPUs; the padded rows are sliced off the logits, so they are never sampled and never enter the loss.

What is not the model lives elsewhere: the key/value cache that decoding passes in
(``lmtrain.kvcache``), and the losses a caller may choose instead of the standard one
(``lmtrain.loss``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmtrain.config import ArchitectureConfig

VOCAB_MULTIPLE = 64


@dataclass(kw_only=True)
class GPTConfig(ArchitectureConfig):
    """The model section's architecture plus the vocabulary size (which the tokenizer decides)."""

    vocab_size: int

    @classmethod
    def of(cls, model: ArchitectureConfig, vocab_size: int) -> "GPTConfig":
        """From the ``model`` section (its architecture fields; ``init_from`` is not one)."""
        fields = {f.name for f in dataclasses.fields(ArchitectureConfig)}
        return cls(vocab_size=vocab_size, **{k: v for k, v in dataclasses.asdict(model).items() if k in fields})

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self) -> int:
        """The MLP's inner width (SwiGLU: of each of its gate and up halves)."""
        if self.mlp_hidden:
            return self.mlp_hidden
        return swiglu_hidden(self.n_embd) if self.mlp == "swiglu" else 4 * self.n_embd

    @property
    def eps(self) -> float:
        """The norms' epsilon: ``model.norm_eps``, or lmtrain's defaults (RMSNorm 1e-6, LayerNorm 1e-5)."""
        return self.norm_eps or (RMS_EPS if self.norm == "rmsnorm" else LAYERNORM_EPS)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RMS_EPS = 1e-6  # lmtrain's RMSNorm (and qk_norm) epsilon when model.norm_eps is 0
LAYERNORM_EPS = 1e-5  # nn.LayerNorm's default, and GPT-2's layer_norm_epsilon


def swiglu_hidden(n_embd: int) -> int:
    """SwiGLU's inner width: 2/3 of 4x keeps the parameter count of the GELU MLP (three matrices
    instead of two), rounded up to a multiple of 64 for fast matmuls."""
    return math.ceil(int(8 * n_embd / 3) / 64) * 64


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.eps)
    return nn.LayerNorm(config.n_embd, eps=config.eps, bias=config.bias)


class QKNorm(nn.Module):
    """RMSNorm over each head's queries and keys (``model.qk_norm``), one learned scale for q and
    one for k (Qwen3's q_norm and k_norm): it bounds the attention logits, which lets a higher
    learning rate train stably. Applied to q and k together, as they come out of the fused qkv."""

    def __init__(self, head_dim: int, eps: float = RMS_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(2, 1, head_dim))  # [q, k], broadcast over heads

    def forward(self, qk: torch.Tensor) -> torch.Tensor:  # (B, T, 2, n_head, head_dim)
        return F.rms_norm(qk, (qk.size(-1),), eps=self.eps) * self.weight

    def one(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """Queries (``which`` 0) or keys (1) alone, (B, T, heads, head_dim): with grouped-query
        attention they have different head counts and cannot be stacked."""
        return F.rms_norm(x, (x.size(-1),), eps=self.eps) * self.weight[which]


def make_dropout(config: GPTConfig) -> nn.Module:
    # Identity when off: a Dropout(0) still costs a call per layer, which shows in decoding.
    return Dropout(config.dropout) if config.dropout > 0 else nn.Identity()


def dropout_scale(shape, p: float, device, dtype) -> torch.Tensor:
    """Dropout's multiplier for a tensor of ``shape``: 0 with probability ``p`` (to 1/65,536),
    else 1 / (1 - p). ``bernoulli_`` draws one random number per element, a fifth of a small
    model's step on a CPU; one 64-bit draw here gives four 16-bit lanes, 6x faster."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    dropped_lanes = round(p * 65536)
    keep = words.view(torch.int16)[:n].view(shape) >= dropped_lanes - 32768
    return keep.to(dtype).mul_(65536 / (65536 - dropped_lanes))


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training's dropout with the mask ``dropout_scale`` draws."""
    return x * dropout_scale(x.shape, p, x.device, x.dtype)


class Dropout(nn.Module):
    """``nn.Dropout``, or with ``explicit`` (``GPT.drop_explicitly``) ``dropout`` above."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p, self.explicit = p, False

    def forward(self, x):
        if not self.training:
            return x
        return dropout(x, self.p) if self.explicit else F.dropout(x, self.p, True)


def attention_with_dropout(q, k, v, p: float) -> torch.Tensor:
    """Causal attention with dropout on its probabilities, written out: on a CPU PyTorch's fused
    attention has no dropout, and its own fallback is 1.6x slower than these steps."""
    B, H, T, D = q.shape
    if k.size(1) != H:
        k, v = (t.repeat_interleave(H // t.size(1), dim=1) for t in (k, v))
    future = torch.full((T, T), float("-inf"), device=q.device, dtype=q.dtype).triu(1)
    # the scale and the causal mask fused into the scores' matmul
    scores = torch.baddbmm(future, q.reshape(B * H, T, D), k.reshape(B * H, T, D).transpose(1, 2),
                           alpha=1.0 / math.sqrt(D))
    probs = dropout(scores.softmax(-1), p)
    return (probs @ v.reshape(B * H, T, D)).view(B, H, T, D)


# --------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------


def rope_tables(head_dim: int, length: int, theta: float, config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, head_dim // 2) for positions 0..length-1 (``config``: a
    GPTConfig whose ``rope_scaling`` rescales the frequencies)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if config is not None and config.rope_scaling == "llama3":
        inv_freq = llama3_frequencies(inv_freq, config)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def llama3_frequencies(inv_freq: torch.Tensor, config) -> torch.Tensor:
    """Llama 3.1's rope scaling, step for step as transformers computes it
    (``_compute_llama3_parameters``): long wavelengths slowed by ``factor``, short ones kept,
    the band between blended smoothly."""
    factor, low, high = config.rope_scaling_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    old_context = config.rope_original_context
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of the last dimension by position (cos and sin
    broadcast against x's leading dimensions)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.head_dim = config.n_head, config.kv_heads, config.head_size
        width = self.n_head * self.head_dim
        # q, k and v as one matmul: q's rows, then k's, then v's (k and v have n_kv heads each).
        self.qkv = nn.Linear(config.n_embd, width + 2 * self.n_kv * self.head_dim, bias=config.bias or config.qkv_bias)
        self.proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.proj.is_residual_projection = True
        self.dropout = config.dropout
        self.explicit = False  # GPT.drop_explicitly
        self.resid_dropout = make_dropout(config)
        self.rope = config.pos_embedding == "rope"
        self.qk_norm = QKNorm(self.head_dim, config.norm_eps or RMS_EPS) if config.qk_norm else None

    def forward(self, x, rope=None, cache=None):
        B, T, C = x.shape
        if self.n_kv == self.n_head:
            qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim)
            qk = qkv[:, :, :2] if self.qk_norm is None else self.qk_norm(qkv[:, :, :2])
            if self.rope:
                qk = apply_rope(qk, *rope)  # q and k rotated in one go
            q, k = qk.unbind(2)
            v = qkv[:, :, 2]
        else:
            q, k, v = self.qkv(x).split([self.n_head * self.head_dim, self.n_kv * self.head_dim,
                                         self.n_kv * self.head_dim], dim=-1)
            q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
            if self.qk_norm is not None:
                q, k = self.qk_norm.one(q, 0), self.qk_norm.one(k, 1)
            if self.rope:  # rope's tables broadcast over (q|k, heads): drop the q|k axis
                cos, sin = (t.squeeze(-3) for t in rope)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask, causal = None, True
        if cache is not None:
            k, v, mask, causal = cache.update(self.layer, k, v)
        if self.explicit and self.training and self.dropout > 0 and cache is None:
            y = attention_with_dropout(q, k, v, self.dropout)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal,
                dropout_p=self.dropout if self.training else 0.0,
                **({"enable_gqa": True} if self.n_kv != self.n_head else {}),
            )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = config.mlp_width
        # SwiGLU's gate and up projections as one matmul: one call instead of two per token.
        self.up = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.relu2 = config.mlp == "relu2"
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.proj.is_residual_projection = True
        self.dropout = make_dropout(config)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.relu2:
            h = F.relu(self.up(x)).square()  # squared ReLU (Primer; the modded-nanogpt speedrun)
        else:
            h = F.gelu(self.up(x), approximate="tanh")
        return self.dropout(self.proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None):
        x = x + self.attn(self.norm1(x), rope, cache)
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_embedding == "learned" else None
        self.drop = make_dropout(config)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.pos_embedding == "rope":
            cos, sin = rope_tables(config.head_size, config.block_size, config.rope_theta, config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2: N(0, 0.02), with the projections that write into the residual stream scaled
        # by 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth. With
        # model.zero_init_proj they start at zero instead (each block starts as the identity),
        # and so does an untied head (the first logits are uniform), as in the modded-nanogpt
        # speedrun.
        if isinstance(module, nn.Linear):
            std = 0.02
            residual = getattr(module, "is_residual_projection", False)
            if residual:
                std /= math.sqrt(2 * self.config.n_layer)
            if self.config.zero_init_proj and (residual or (module is self.lm_head and not self.config.tie_embeddings)):
                std = 0.0
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None, loss_fn=None,
                layout=None):
        """Logits over the real vocabulary for every position, and the mean loss if ``targets``
        (over the targets that are not -100, the ignore index).

        ``cache`` (an ``lmtrain.kvcache.KVCache``) holds earlier positions' keys and values: the
        pass then covers only the new positions and returns the last one's logits. ``layout``
        (``lmtrain.packing.PackedLayout``) gives several sequences packed in a row their own
        positions and attention. ``loss_fn`` (see ``lmtrain.loss``) computes the loss from the
        final hidden states without logits; the logits then come back as None.
        """
        x = self.hidden_states(idx, cache if cache is not None else layout)
        if targets is not None and loss_fn is not None:
            return None, loss_fn(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                 self.config.vocab_size, self.config.logit_softcap)
        if targets is None and cache is not None:
            x = x[:, -1:, :]  # generation needs the last position only
        logits = self.logits(x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head over the real vocabulary, soft-capped if ``model.logit_softcap``."""
        logits = self.lm_head(hidden)[..., : self.config.vocab_size]
        cap = self.config.logit_softcap
        if cap:
            # Bounds the logits smoothly to (-cap, cap): the model cannot grow overconfident by
            # scaling them, which the modded-nanogpt speedrun found to help (Gemma 2 does it too).
            logits = cap * torch.tanh(logits.float() / cap)
        return logits

    def hidden_states(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        """The final (normalised) hidden state of every position: what the LM head reads.

        ``cache`` decides the positions and what each one attends to (``begin``/``update``/
        ``advance``, see ``lmtrain.kvcache``); its positions may be one row for the whole batch,
        (T,), or one per sequence, (B, T), as ``lmtrain.tasks`` uses to pack several
        continuations of one context into a sequence.
        """
        B, T = idx.shape
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} positions exceeds block_size {self.config.block_size}")
            positions = torch.arange(T, device=idx.device)
        else:
            positions = cache.begin(T, idx.device)
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            # Shaped (T, 1, 1, head_dim/2), or (B, T, 1, 1, head_dim/2) for positions per sequence,
            # to broadcast over (B, T, q|k, head, head_dim/2).
            rope = (self.rope_cos[positions, None, None], self.rope_sin[positions, None, None])
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm_f(x)

    # ---------------------------------------------------------------------------------------

    def drop_explicitly(self, on: bool = True) -> None:
        """Train with ``dropout``'s masks and attention written out (``attention_with_dropout``)
        rather than PyTorch's dropout and fused attention. On a CPU, whose fused attention has no
        dropout, a step of the small-corpus model with dropout 0.1 is 1.2-1.3x faster; a GPU's fused
        kernels drop in place and never hold the T x T scores. The training step chooses
        (``lmtrain.step``); the numbers differ (other masks), the mathematics does not."""
        for module in self.modules():
            if isinstance(module, (Dropout, CausalSelfAttention)):
                module.explicit = on

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters, each shared tensor counted once; without the embedding tables if asked."""
        total = sum(p.numel() for p in self.parameters())
        if not embeddings:
            total -= self.wte.weight.numel()
            if self.wpe is not None:
                total -= self.wpe.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls (forward + backward) plus attention.

        N excludes the embedding tables but includes the LM head (a real matmul even when tied);
        attention adds 12 * n_layer * (n_head * head size) * T (PaLM, appendix B).
        """
        c = self.config
        T = seq_len or c.block_size
        n = self.num_params(embeddings=False)
        if c.tie_embeddings:
            n += self.lm_head.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_size * T
