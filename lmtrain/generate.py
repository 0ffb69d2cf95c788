"""Token generation: the sampling rule, and the cached and uncached decoding loops.

Two loops produce the same tokens. ``generate`` keeps a key/value cache: the prompt is processed
once, then one position per forward pass. ``generate_uncached`` runs the whole sequence (its last
``block_size`` tokens) through the model for every new token; it is slow, and kept as the
reference the cached loop is tested against (and as ``lmtrain sample --no-cache``).

Past ``block_size`` positions the cached loop slides its window: it keeps the last half of the
context, recomputes the cache over it, and goes on. Both position schemes stay within the
positions they were trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from lmtrain.model import GPT, KVCache, amp_context


@dataclass
class SamplingParams:
    temperature: float = 0.8  # 0 means greedy
    top_k: int | None = None
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V): greedy, or temperature + top-k + top-p."""
    logits = logits.float()
    if params.greedy:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


@torch.inference_mode()
def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, params: SamplingParams,
             generator: torch.Generator | None = None,
             amp_dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """Yield (B, 1) tensors of new tokens, one per step, using a key/value cache."""
    block = model.config.block_size
    batch, device = prompt.size(0), prompt.device
    context = prompt
    if context.size(1) > block:
        context = context[:, -block:]
    dtype = amp_dtype or next(model.parameters()).dtype
    cache = KVCache(model.config, batch, block, device, dtype)
    with amp_context(device, amp_dtype):
        logits, _ = model(context, cache=cache)
    for _ in range(max_new_tokens):
        token = next_token(logits[:, -1, :], params, generator)
        yield token
        context = torch.cat([context, token], dim=1)
        if cache.pos >= block:
            # Slide: keep the last half of the window, rebuild the cache over it.
            context = context[:, -(block // 2):]
            cache = KVCache(model.config, batch, block, device, dtype)
            with amp_context(device, amp_dtype):
                logits, _ = model(context, cache=cache)
        else:
            with amp_context(device, amp_dtype):
                logits, _ = model(token, cache=cache)


@torch.inference_mode()
def generate_uncached(model: GPT, prompt: torch.Tensor, max_new_tokens: int, params: SamplingParams,
                      generator: torch.Generator | None = None,
                      amp_dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """The reference loop: recompute the whole (cropped) sequence for every new token."""
    block = model.config.block_size
    context = prompt
    for _ in range(max_new_tokens):
        with amp_context(prompt.device, amp_dtype):
            logits, _ = model(context[:, -block:])
        token = next_token(logits[:, -1, :], params, generator)
        yield token
        context = torch.cat([context, token], dim=1)
