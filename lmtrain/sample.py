"""`lmtrain sample`: generate text from a checkpoint, streamed as it is produced.

Text is handed to a callback piece by piece. Pieces are whole characters: a token can end in
the middle of a multi-byte UTF-8 character, so decoded text that ends in an incomplete character
is held back until the next token completes it. Text that could still turn out to be the start
of a stop string is held back too, so a stop string is never half printed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lmtrain.config import SampleConfig, override_section
from lmtrain.errors import ConfigError, LmtrainError, first_line
from lmtrain.generate import Decoder, SamplingParams, generate, generate_uncached
from lmtrain.inference import LoadedModel, load_model

REPLACEMENT = "\ufffd"


@dataclass
class SampleOptions:
    """What to generate; ``None`` fields fall back to the run config's ``sample`` section."""

    checkpoint: str = "best"
    prompt: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    num_samples: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    device: str = "auto"
    use_cache: bool = True
    cuda_graph: bool = True  # on CUDA: replay the one-token step as a captured graph
    compile: bool = False  # compile the one-token step (AOTInductor on a CPU, torch.compile on CUDA)


@dataclass
class SampleStats:
    samples: list[str]
    tokens: int
    seconds: float
    checkpoint: Path
    device: str

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def sample(run_dir: Path, options: SampleOptions,
           on_text: Callable[[int, str], None] = lambda i, text: None) -> SampleStats:
    """Generate ``num_samples`` continuations; ``on_text(sample_index, piece)`` streams them."""
    loaded = load_model(run_dir, options.checkpoint, options.device)
    cfg = resolve_options(loaded.config.sample, options)
    params = SamplingParams(temperature=0.0 if options.greedy else cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p)
    max_new, num_samples = cfg.max_new_tokens, cfg.num_samples
    seed = cfg.seed if cfg.seed is not None else loaded.config.run.seed
    stops = [s for s in cfg.stop if s]
    prompt_ids = prompt_tokens(loaded, cfg.prompt)

    if options.compile and not options.use_cache:
        raise ConfigError("--compile compiles the cached step; it cannot go with --no-cache")
    # One decoder for every sample, so a CUDA graph is captured (or, on a CPU, the step compiled)
    # once per run, before the clock starts: tokens/s is the generation's. On CUDA a compiled
    # step compiles on its first use, inside it.
    # The decoder's own default picks a CUDA graph on CUDA unless compiling; the flag only opts out.
    # The cache holds what a sample needs (prompt and new tokens), not a long context it never fills.
    decoder = _decoder(loaded, options, len(prompt_ids) + max_new + 1) if options.use_cache else None
    generator = torch.Generator().manual_seed(seed)
    texts, total_tokens = [], 0
    start = time.perf_counter()
    for index in range(num_samples):
        on_text(index, "")  # a sample starts (it may produce no text at all)
        text, n = _one_sample(loaded, prompt_ids, max_new, params, generator, stops, decoder,
                              lambda piece, i=index: on_text(i, piece))
        texts.append(text)
        total_tokens += n
    seconds = time.perf_counter() - start
    return SampleStats(texts, total_tokens, seconds, loaded.checkpoint, str(loaded.device))


def _decoder(loaded: LoadedModel, options: SampleOptions, length: int) -> Decoder:
    try:
        return Decoder(loaded.model, 1, loaded.amp_dtype, cuda_graph=None if options.cuda_graph else False,
                       compile=options.compile, length=length)
    except Exception as error:
        if not options.compile:
            raise
        # Building the step needs a working C++ compiler on a CPU: an environment the user can
        # fix, or avoid by decoding without --compile.
        raise LmtrainError(f"--compile could not build the decoding step ({type(error).__name__}: "
                           f"{first_line(error, 300)}); sample without --compile") from error


# The options of `lmtrain sample` that stand in for keys of the config's sample section.
OPTION_LABELS = {"prompt": "--prompt", "max_new_tokens": "--max-new-tokens", "temperature": "--temperature",
                 "top_k": "--top-k", "top_p": "--top-p", "num_samples": "--num-samples", "seed": "--seed",
                 "stop": "--stop"}


def resolve_options(section: SampleConfig, options: SampleOptions) -> SampleConfig:
    """The run config's sample section with the options given on top, all validated by the
    config's own schema (so ``--top-p 2`` and ``sample.top_p: 2`` get the same check)."""
    given = {key: getattr(options, key) for key in OPTION_LABELS if getattr(options, key) is not None}
    if not given.get("stop"):
        given.pop("stop", None)
    return override_section(section, "sample", given, OPTION_LABELS)


def prompt_tokens(loaded: LoadedModel, text: str) -> list[int]:
    """The prompt's ids, after the tokenizer's BOS where it has one; an empty prompt starts from
    the BOS, or from the end-of-text token."""
    if not text:
        return list(loaded.bos) or [loaded.eot_id]
    ids = list(loaded.bos) + loaded.tokenizer.encode(text, add_special_tokens=False).ids
    block = loaded.model.config.block_size
    if len(ids) >= block and loaded.model.config.pos_embedding == "learned":
        raise LmtrainError(
            f"the prompt is {len(ids)} tokens; with learned positions it must be shorter than the "
            f"context (model.block_size = {block}), to leave room for new tokens"
        )
    return ids


def _one_sample(loaded: LoadedModel, prompt_ids: list[int], max_new: int, params: SamplingParams,
                generator: torch.Generator, stops: list[str], decoder: Decoder | None,
                emit: Callable[[str], None]) -> tuple[str, int]:
    """One sample, through ``decoder`` (the cached loop) or, when it is None, the uncached one."""
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=loaded.device)
    if decoder is not None:
        tokens = generate(loaded.model, prompt, max_new, params, generator, loaded.amp_dtype, decoder=decoder)
    else:
        tokens = generate_uncached(loaded.model, prompt, max_new, params, generator, loaded.amp_dtype)
    stream = TextStream(loaded.tokenizer, stops, emit)
    produced = 0
    for token in tokens:
        token_id = int(token[0, 0])
        produced += 1
        if token_id == loaded.eot_id or token_id in loaded.stop_ids or stream.add(token_id):
            break
    return stream.finish(), produced


class TextStream:
    """Incremental detokenisation with hold-back for incomplete characters and stop strings."""

    def __init__(self, tokenizer, stops: list[str], emit: Callable[[str], None]) -> None:
        self.tokenizer, self.stops, self.emit = tokenizer, stops, emit
        self.ids: list[int] = []
        self.decoded = 0  # self.ids[:decoded] are in self.text; the rest end mid-character
        self.text = ""  # decoded so far (complete characters only)
        self.sent = 0  # characters of self.text already emitted
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.stopped = False

    def add(self, token_id: int) -> bool:
        """Take one token; return True when a stop string has been reached."""
        self.ids.append(token_id)
        # Byte-level BPE decodes by concatenating bytes, so only the tokens since the last whole
        # character need decoding (decoding all of them every token would grow with the sample).
        piece = self.tokenizer.decode(self.ids[self.decoded:], skip_special_tokens=False)
        if piece.endswith(REPLACEMENT):
            return False  # an incomplete character: wait for the bytes that finish it
        self.text += piece
        self.decoded = len(self.ids)
        cut = self._stop_position()
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            self._flush(len(self.text))
            return True
        self._flush(len(self.text) - self.holdback)
        return False

    def finish(self) -> str:
        if not self.stopped:
            decoded = self.tokenizer.decode(self.ids, skip_special_tokens=False)
            self.text = decoded
            self._flush(len(self.text))
        return self.text

    def _stop_position(self) -> int | None:
        # Only the tail can hold a new stop string: search from just before what was emitted.
        hits = [self.text.find(s, max(0, self.sent - len(s))) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None

    def _flush(self, upto: int) -> None:
        if upto > self.sent:
            self.emit(self.text[self.sent:upto])
            self.sent = upto



def sample_text(model, tokenizer, prompt: str, eot: int, params: SamplingParams, seed: int,
                amp_dtype: torch.dtype | None, max_new_tokens: int = 64) -> str:
    """A short sample from a model in training (TensorBoard's text tab): the prompt and what follows.

    Decoded eagerly: 64 tokens do not repay a CUDA graph's capture and weight copy. The model is
    put back in training mode afterwards.
    """
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else [eot]
    device = next(model.parameters()).device
    context = torch.tensor([ids[-model.config.block_size:]], device=device)
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    decoder = Decoder(model, 1, amp_dtype, cuda_graph=False)
    new = [int(t) for t in generate(model, context, max_new_tokens, params, generator, amp_dtype, decoder=decoder)]
    model.train()
    return tokenizer.decode(ids + new, skip_special_tokens=False)
