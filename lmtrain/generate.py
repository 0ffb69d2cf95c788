"""Token generation: the sampling rule, and the cached and uncached decoding loops.

Two loops produce the same tokens. ``generate`` keeps a key/value cache: the prompt is processed
once, then one position per forward pass. ``generate_uncached`` runs the whole sequence (its last
``block_size`` tokens) through the model for every new token; it is slow, and kept as the
reference the cached loop is tested against (and as ``lmtrain sample --no-cache``).

The cached loop runs through a ``Decoder``. On a CPU it is the model called eagerly over a cache
that grows step by step. On CUDA, one-token steps of a small batch are all launch overhead in
eager mode (a 124M model's step is some 200 small kernels), so the decoder keeps a copy of the
weights in the inference dtype, a static cache, and replays the step as one captured CUDA graph.
``compile=True`` instead compiles the step over a static cache, after seconds of compilation: on a
CPU ahead of time with AOTInductor (``torch.export`` then a shared library, called with no Dynamo
guards and no Python graph wrapper, which are half a small model's step), on CUDA with
``torch.compile``.

What holds between the two loops: as long as prompt and output fit in ``block_size`` positions,
they see the same context and greedy decoding gives the same tokens (tested). Past it, the
uncached loop crops to the last ``block_size`` tokens at every step, while the cached loop slides
its window when the cache is full: it keeps the last three quarters of the context (``SLIDE_KEEP``),
recomputes the cache over them, and steps on until it is full again, so it always sees between
three quarters of a window and a whole one. From the first slide on the two may differ. Keeping
more would mean re-prefilling more often (keeping 3/4 costs one prefill of 3/4 of a window every
quarter window of new tokens; ``scripts/bench_sample.py`` measures it). Both position schemes stay
within the positions they were trained on.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from lmtrain.device import autocast
from lmtrain.kvcache import KVCache
from lmtrain.model import GPT

# When the cache is full, the share of the window the cached loop keeps (and recomputes).
SLIDE_KEEP = 0.75


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
    return draw(probs.cpu(), generator).to(logits.device)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of ``probs`` (B, V), by inverse CDF: one uniform number per row.

    ``torch.multinomial`` draws a random number per category, some 100 us a row on a CPU at a
    4K vocabulary: as long as a small model's whole compiled step.
    """
    cdf = probs.double().cumsum(dim=-1)
    # u in (0, total]: never 0 (which would pick a leading zero-probability category) and never
    # past the last cdf value (which rounding could do to a u in [0, total)).
    u = (1 - torch.rand((probs.size(0), 1), generator=generator, dtype=torch.float64)) * cdf[:, -1:]
    # The first category whose cdf reaches u: P(i) = P(cdf[i-1] < u <= cdf[i]) = p_i / total,
    # and a category of probability 0 never has cdf[i-1] < cdf[i].
    return torch.searchsorted(cdf, u)


class Decoder:
    """The model over a key/value cache: ``prefill`` a context, then ``step`` one token at a time.

    ``cuda_graph`` (default: on CUDA) captures the one-token step once, at construction, and
    replays it: the step's inputs and outputs are fixed tensors, the cache is static, and the
    weights are a copy in ``amp_dtype`` (casting fp32 weights on every step would move four
    times the bytes a bf16 step needs). ``compile`` instead compiles the step (static cache too):
    on a CPU ahead of time, at construction, into a library that holds its own copy of the
    weights; on CUDA with ``torch.compile``, on its first use. A decoder serves any number of
    generations of its batch size, so the capture or compilation is paid once; like a captured
    graph, a compiled step does not see later changes to the model's weights.
    """

    def __init__(self, model: GPT, batch: int, amp_dtype: torch.dtype | None = None,
                 cuda_graph: bool | None = None, compile: bool = False, length: int | None = None) -> None:
        device = next(model.parameters()).device
        # The positions the cache holds: the context, or fewer when a generation needs fewer (a real
        # model's context is 8k-128k tokens; a static cache that long costs memory and, since a
        # static step attends to the whole buffer, time). Past it, generation slides as at the context.
        self.block = min(model.config.block_size, length or model.config.block_size)
        if cuda_graph is None:
            cuda_graph = device.type == "cuda" and not compile
        if cuda_graph and compile:
            raise ValueError("a decoder either compiles its step or captures it as a CUDA graph, not both")
        if cuda_graph:
            if device.type != "cuda":
                raise ValueError("CUDA graphs need a model on a CUDA device")
            model = _cast_weights(model, amp_dtype) if amp_dtype is not None else model
            amp_dtype = None  # the weights are already in the inference dtype
        self.model, self.amp_dtype, self.device = model, amp_dtype, device
        dtype = amp_dtype or next(model.parameters()).dtype
        self.cache = KVCache(model.config, batch, self.block, device, dtype, static=cuda_graph or compile)
        self.batch = batch
        # A compiled step sees the same shapes at every position (static cache): one compile.
        # On a CPU, Dynamo's guards and the Python wrapper around a torch.compile'd graph cost as
        # much as a small model's kernels, so the step is compiled ahead of time there instead.
        compile_here = compile and device.type == "cpu"
        if compile_here and amp_dtype is not None:
            raise ValueError("a step compiled ahead of time on a CPU runs in the weights' dtype; pass no amp_dtype")
        self.compiled_step = compile_step_ahead_of_time(model, self.cache, batch) if compile_here else None
        self.step_model = (torch.compile(model, dynamic=False, fullgraph=True)
                           if compile and not compile_here else model)
        self.graph = self._capture(batch) if cuda_graph else None

    @property
    def full(self) -> bool:
        return self.cache.pos >= self.block

    @torch.inference_mode()
    def prefill(self, context: torch.Tensor) -> torch.Tensor:
        """Start over from ``context`` (B, T <= block_size); return the last position's logits."""
        self.cache.reset()
        logits = self._forward(context)
        if self.cache.static:
            self.cache.pos = context.size(1)
        return logits

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append one token per sequence (B, 1); return the logits for the next (B, V)."""
        if self.compiled_step is not None:
            # The library trusts its inputs' shapes: a wrong batch would read out of bounds.
            if token.shape != (self.batch, 1):
                raise ValueError(f"this decoder steps ({self.batch}, 1) tokens, got {tuple(token.shape)}")
            cache = self.cache
            logits = self.compiled_step(token, cache.pos_tensor, *cache.keys, *cache.values)
        elif self.graph is None:
            logits = self._forward(token, self.step_model)
        else:
            self.token.copy_(token)
            self.graph.replay()  # also advances the cache's device-side position
            logits = self.logits
        if self.cache.static:
            self.cache.pos += 1
        return logits

    def _forward(self, idx: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        with autocast(self.device, self.amp_dtype):
            logits, _ = (self.model if model is None else model)(idx, cache=self.cache)
        return logits[:, -1, :]

    @torch.inference_mode()
    def _capture(self, batch: int) -> "torch.cuda.CUDAGraph":
        # Warm up on a side stream (as torch.cuda.graphs asks), capture one step, then put the
        # cache back to empty: what the warm-up wrote is masked out until real steps overwrite it.
        self.token = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(self.token)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.cache.reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._forward(self.token)
        self.cache.reset()
        return graph


class _StepOverTensors(torch.nn.Module):
    """The one-token step as a function of tensors only (token, position, cache buffers): the
    form ``torch.export`` takes. The cache buffers are updated in place, as in eager mode."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, token: torch.Tensor, pos: torch.Tensor, *buffers: torch.Tensor) -> torch.Tensor:
        half = len(buffers) // 2
        logits, _ = self.model(token, cache=KVCache.over(buffers[:half], buffers[half:], pos))
        return logits[:, -1, :]


def compile_step_ahead_of_time(model: GPT, cache: KVCache, batch: int) -> Callable[..., torch.Tensor]:
    """Export the one-token step over ``cache`` and compile it with AOTInductor.

    The result is called as ``step(token, cache.pos_tensor, *cache.keys, *cache.values)`` and
    returns the next logits (B, V). The library is built in a temporary directory and loaded
    from there (it is never kept on disk, so no run directory ever holds code to load); it
    holds a copy of the weights as they are now.
    """
    token = torch.zeros((batch, 1), dtype=torch.long, device=cache.pos_tensor.device)
    inputs = (token, cache.pos_tensor, *cache.keys, *cache.values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecation notices from torch's own internals
        with torch.no_grad():
            exported = torch.export.export(_StepOverTensors(model).eval(), inputs)
        with tempfile.TemporaryDirectory(prefix="lmtrain-step-") as tmp:
            package = torch._inductor.aoti_compile_and_package(exported, package_path=str(Path(tmp) / "step.pt2"))
            compiled = torch._inductor.aoti_load_package(package)
    loader = getattr(compiled, "loader", None)
    if loader is None:
        return compiled
    # The loaded model's __call__ parses its input and output specs (JSON) and flattens the
    # inputs on every call: some 50 us, a quarter of the step. The inputs here are already the
    # flat list of tensors the library takes (a fresh list per call: the boxed call consumes it).
    return lambda *tensors: loader.boxed_run(list(tensors))[0]


def _cast_weights(model: GPT, dtype: torch.dtype) -> GPT:
    """A copy of ``model`` whose parameters are ``dtype``; buffers (the RoPE tables) stay fp32."""
    if next(model.parameters()).dtype == dtype:
        return model
    cast = copy.deepcopy(model)  # keeps tied weights tied
    for param in cast.parameters():
        param.data = param.data.to(dtype)
    return cast.eval()


def slide_keep(block_size: int) -> int:
    """Tokens of context the cached loop keeps when it slides (at least one, at most block - 1)."""
    return min(block_size - 1, max(1, int(block_size * SLIDE_KEEP)))


@torch.inference_mode()
def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, params: SamplingParams,
             generator: torch.Generator | None = None,
             amp_dtype: torch.dtype | None = None, decoder: Decoder | None = None) -> Iterator[torch.Tensor]:
    """Yield (B, 1) tensors of new tokens, one per step, using a key/value cache.

    ``decoder`` may be passed to reuse one (and its captured graph) across calls; it must have
    been built for this model, batch size and ``amp_dtype``.
    """
    decoder = decoder or Decoder(model, prompt.size(0), amp_dtype)
    block = decoder.block
    context = prompt[:, -block:]
    logits = decoder.prefill(context)
    for _ in range(max_new_tokens):
        token = next_token(logits, params, generator)
        yield token
        context = torch.cat([context, token], dim=1)
        if decoder.full:
            # Slide: keep the last SLIDE_KEEP of the window, rebuild the cache over it.
            context = context[:, -slide_keep(block):]
            logits = decoder.prefill(context)
        else:
            logits = decoder.step(token)


@torch.inference_mode()
def generate_uncached(model: GPT, prompt: torch.Tensor, max_new_tokens: int, params: SamplingParams,
                      generator: torch.Generator | None = None,
                      amp_dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """The reference loop: recompute the whole (cropped) sequence for every new token."""
    block = model.config.block_size
    context = prompt
    for _ in range(max_new_tokens):
        with autocast(prompt.device, amp_dtype):
            logits, _ = model(context[:, -block:])
        token = next_token(logits[:, -1, :], params, generator)
        yield token
        context = torch.cat([context, token], dim=1)
