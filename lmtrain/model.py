"""The GPT: a decoder-only transformer in plain PyTorch, readable top to bottom.

    tokens -> token embedding (+ learned positions) -> n_layer x Block -> final norm -> LM head

    Block(x) = x + Attention(Norm(x))      causal self-attention, optionally with RoPE
             = x + MLP(Norm(x))            GELU 4x, or SwiGLU

Choices are config keys (``model.*``): learned or rotary positions, LayerNorm or RMSNorm, GELU
or SwiGLU, tied or separate input/output embeddings. The embedding table is padded to a multiple
of 64 rows because matmuls with such shapes are markedly faster on GPUs; the padded rows are
sliced off the logits, so they are never sampled and never enter the loss.

Generation keeps a key/value cache (``KVCache``): the prompt is processed once, then each new
token costs one forward pass over one position.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB_MULTIPLE = 64


@dataclass
class GPTConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    dropout: float = 0.0
    bias: bool = False
    pos_embedding: str = "learned"  # "learned" or "rope"
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    mlp: str = "gelu"  # "gelu" or "swiglu"
    tie_embeddings: bool = True
    rope_theta: float = 10000.0

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


def amp_context(device: torch.device, amp_dtype: torch.dtype | None):
    """Autocast to ``amp_dtype`` on ``device``; no autocast (full precision) when it is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-6)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def make_dropout(config: GPTConfig) -> nn.Module:
    # Identity when off: a Dropout(0) still costs a call per layer, which shows in decoding.
    return nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()


# --------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, head_dim // 2) for positions 0..length-1."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of the last dimension by position (cos and sin
    broadcast against x's leading dimensions)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


# --------------------------------------------------------------------------------------------
# The loss, chunked: the LM head and cross-entropy without materialising every logit
# --------------------------------------------------------------------------------------------

# Logits held at once per chunk: about 4 MB of fp32, small enough to stay in the CPU's cache.
CE_CHUNK_ELEMENTS = 1 << 20


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight[:vocab].T`` against ``targets``, computed chunk by chunk.

    The standard path writes the (tokens x vocab) logits to memory, reads them for log-softmax,
    writes that, and in backward zero-fills and rewrites a tensor of the same size: on a CPU that
    memory traffic costs as much as a good part of the model's matmuls. Here each chunk of tokens
    gets its logits, its loss and its gradient (softmax minus one-hot) while the chunk is still in
    cache; the forward pass already computes d(loss)/dh and d(loss)/dweight, which backward only
    scales. Same math, same matmuls, a fraction of the memory.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size):
        n = h.size(0)
        chunk = max(16, CE_CHUNK_ELEMENTS // vocab_size)
        w = weight[:vocab_size]
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, n, chunk):
            h_c, t_c = h[start:start + chunk], targets[start:start + chunk, None]
            logits = (h_c @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            total += (lse - logits.gather(1, t_c)).sum()
            probs = logits.sub_(lse).exp_()  # softmax, in place
            probs.scatter_add_(1, t_c, torch.full_like(t_c, -1, dtype=probs.dtype))
            probs.div_(n)
            g = probs.to(h.dtype)
            grad_h[start:start + chunk] = g @ w
            grad_w[:vocab_size].addmm_(g.t(), h_c)
        ctx.save_for_backward(grad_h, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None


# --------------------------------------------------------------------------------------------
# Key/value cache for generation
# --------------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values of every layer, for ``batch`` sequences of ``length`` positions.

    The model calls ``begin(T)`` before a pass over T new positions (it returns their positions
    and sets the attention mask), ``update`` in each layer, and ``advance(T)`` after the pass.

    By default the position lives on the host and attention spans only the filled part: the
    least work in eager mode. With ``static=True`` the position also lives in a device tensor and
    attention always spans the whole buffer, masked: every one-token step then has the same
    shapes and reads no host value, which is what capturing it as a CUDA graph needs
    (``generate.Decoder``).
    """

    def __init__(self, config: GPTConfig, batch: int, length: int, device, dtype, static: bool = False) -> None:
        shape = (batch, config.n_head, length, config.head_dim)
        self._attach([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
                     [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
                     torch.zeros((), dtype=torch.long, device=device) if static else None)

    @classmethod
    def over(cls, keys: list[torch.Tensor], values: list[torch.Tensor], pos_tensor: torch.Tensor) -> "KVCache":
        """A static cache over existing buffers: how an exported step receives the decoder's cache."""
        cache = cls.__new__(cls)
        cache._attach(list(keys), list(values), pos_tensor)
        return cache

    def _attach(self, keys: list[torch.Tensor], values: list[torch.Tensor], pos_tensor: torch.Tensor | None) -> None:
        self.keys, self.values = keys, values
        self.length = keys[0].size(2)
        self.static = pos_tensor is not None
        self.pos = 0  # positions filled so far (kept on the host in both modes)
        self.pos_tensor = pos_tensor
        self.mask: torch.Tensor | None = None
        self.causal = True
        self._positions: torch.Tensor | None = None

    def reset(self) -> None:
        self.pos = 0
        if self.static:
            self.pos_tensor.zero_()

    def begin(self, T: int, device) -> torch.Tensor | None:
        """Set the mask for T new queries; return their positions (None: ``pos .. pos+T-1``)."""
        if self.static:
            positions = self.pos_tensor + torch.arange(T, device=device)
            self.mask = torch.arange(self.length, device=device) <= positions[:, None]  # (T, length)
            self.causal = False
            self._positions = positions
            return positions
        past = self.pos
        if past == 0:
            self.mask, self.causal = None, True
        elif T == 1:
            self.mask, self.causal = None, False  # one new query sees every cached position
        else:
            # New queries see all past positions and the new ones up to themselves.
            self.mask = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)
            self.causal = False
        return None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's keys/values; return the keys/values attention should see."""
        if self.static:
            self.keys[layer].index_copy_(2, self._positions, k)
            self.values[layer].index_copy_(2, self._positions, v)
            return self.keys[layer], self.values[layer]
        end = self.pos + k.size(2)
        self.keys[layer][:, :, self.pos:end] = k
        self.values[layer][:, :, self.pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, T: int) -> None:
        if self.static:
            # Only the device-side position: a step replayed as a graph (or compiled) runs no
            # host code, so the host-side ``pos`` is kept by whoever drives the cache.
            self.pos_tensor += T
        else:
            self.pos += T


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.proj.is_residual_projection = True
        self.dropout = config.dropout
        self.resid_dropout = make_dropout(config)
        self.rope = config.pos_embedding == "rope"

    def forward(self, x, rope=None, cache: KVCache | None = None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim)
        if self.rope:
            q, k = apply_rope(qkv[:, :, :2], *rope).unbind(2)  # q and k rotated in one go
        else:
            q, k = qkv[:, :, 0], qkv[:, :, 1]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        if cache is None:
            mask, causal = None, True
        else:
            k, v = cache.update(self.layer, k, v)
            mask, causal = cache.mask, cache.causal
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            # 2/3 of 4x keeps the parameter count of the GELU MLP (three matrices instead of two),
            # rounded up to a multiple of 64 for fast matmuls.
            hidden = math.ceil(int(8 * config.n_embd / 3) / 64) * 64
            # Gate and up projections as one matmul: one call instead of two per token.
            self.up = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)
        else:
            hidden = 4 * config.n_embd
            self.up = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.proj.is_residual_projection = True
        self.dropout = make_dropout(config)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)
            h = F.silu(gate) * up
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
            cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2: N(0, 0.02), with the projections that write into the residual stream scaled
        # by 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None):
        """Logits over the real vocabulary for every position; the mean loss if ``targets``.

        When training on a CPU (targets given, gradients on) only the loss is computed and the
        logits come back as None.
        """
        B, T = idx.shape
        # A static cache's position is a device tensor (no host value may enter a captured or
        # compiled step); whoever drives it keeps it in range.
        start = cache.pos if cache is not None and not cache.static else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} positions exceeds block_size {self.config.block_size}")
        positions = cache.begin(T, idx.device) if cache is not None else None
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions if positions is not None else torch.arange(start, start + T, device=idx.device))
        elif positions is not None:
            # Shaped (T, 1, 1, head_dim/2) to broadcast over (B, T, q|k, head, head_dim/2).
            rope = (self.rope_cos[positions, None, None], self.rope_sin[positions, None, None])
        else:
            rope = (self.rope_cos[start:start + T, None, None], self.rope_sin[start:start + T, None, None])
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, cache)
        if cache is not None:
            cache.advance(T)
        x = self.norm_f(x)
        if targets is not None and torch.is_grad_enabled() and x.device.type == "cpu":
            # Training on a CPU: the fused, chunked head + loss (see ChunkedLinearCrossEntropy);
            # the logits themselves are not needed. GPUs keep the standard path, which
            # torch.compile fuses on its own.
            loss = ChunkedLinearCrossEntropy.apply(x.reshape(-1, x.size(-1)), self.lm_head.weight,
                                                   targets.reshape(-1), self.config.vocab_size)
            return None, loss
        if targets is None and cache is not None:
            x = x[:, -1:, :]  # generation needs the last position only
        logits = self.lm_head(x)[..., : self.config.vocab_size]
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    # ---------------------------------------------------------------------------------------

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
        attention adds 12 * n_layer * n_embd * T (PaLM, appendix B).
        """
        c = self.config
        T = seq_len or c.block_size
        n = self.num_params(embeddings=False)
        if c.tie_embeddings:
            n += self.lm_head.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_embd * T
