"""Talking to a model: a conversation rendered with the model's chat template, kept with its key/value
cache across turns (`lmtrain chat`), and the stop rules every chat front end shares (`lmtrain serve`).

``ChatModel`` is a loaded model with its template and what ends a reply: the template's end-of-turn
token (``<|im_end|>``, ``<|eot_id|>``, ...), the end-of-text token and every EOS id of the model's
generation config. ``ChatSession`` is one conversation: each new turn renders the whole conversation,
finds how much of it the cache already holds (all of it but the new user message, normally) and
prefills only the rest. When the conversation would outgrow the context, the oldest turns go (the
system prompt stays) and the session says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from lmtrain.chat_template import ChatTemplate, end_of_turn_token, load_template, read_template, special_tokens_of
from lmtrain.device import autocast
from lmtrain.errors import LmtrainError
from lmtrain.generate import SamplingParams, next_token
from lmtrain.inference import LoadedModel
from lmtrain.kvcache import KVCache
from lmtrain.sample import TextStream


class ContextFull(LmtrainError):
    """The prompt alone does not fit the model's context."""


@dataclass
class ChatModel:
    loaded: LoadedModel
    template: ChatTemplate
    stop_ids: frozenset  # a reply ends at any of these (not shown)
    end_of_turn: str | None  # the template's end-of-turn token, if it has one

    @classmethod
    def of(cls, loaded: LoadedModel) -> "ChatModel":
        if loaded.tokenizer_dir is None or read_template(loaded.tokenizer_dir) is None:
            raise LmtrainError(f"{loaded.checkpoint} has no chat template: it was trained on text (data.format text) "
                               "or ships none. Fine-tune it on conversations (data.format: chat), or use "
                               "`lmtrain sample` to continue text")
        template = load_template(loaded.tokenizer_dir, loaded.tokenizer.id_to_token(loaded.eot_id))
        specials = special_tokens_of(loaded.tokenizer)
        turn_end = end_of_turn_token(template, specials)
        stops = {loaded.eot_id, *loaded.stop_ids}
        if turn_end is not None and loaded.tokenizer.token_to_id(turn_end) is not None:
            stops.add(loaded.tokenizer.token_to_id(turn_end))
        return cls(loaded, template, frozenset(stops), turn_end)

    @property
    def context(self) -> int:
        return self.loaded.model.config.block_size

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The conversation rendered for the assistant's next reply, as ids (the template writes any
        BOS itself; no special tokens are added, as transformers' apply_chat_template tokenizes)."""
        text = self.template.render(messages, add_generation_prompt=True)
        return self.loaded.tokenizer.encode(text, add_special_tokens=False).ids


def fit_messages(model: ChatModel, messages: list[dict], room: int) -> tuple[list[dict], list[int], int]:
    """The newest turns that fit the context with ``room`` tokens left for the reply (the system
    prompt always kept): (messages, their prompt ids, how many messages were dropped)."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    dropped = 0
    while True:
        ids = model.prompt_ids(system + rest)
        if len(ids) + room <= model.context or len(rest) <= 1:
            break
        # Drop whole exchanges from the front: a conversation must start with a user message.
        cut = next((i for i in range(1, len(rest)) if rest[i]["role"] == "user"), len(rest) - 1)
        rest, dropped = rest[cut:], dropped + cut
    if len(ids) >= model.context:
        raise ContextFull(f"the message is {len(ids)} tokens with the template; the model's context is "
                          f"{model.context}")
    return system + rest, ids, dropped


@dataclass
class Reply:
    text: str
    tokens: int
    prefilled: int  # prompt tokens this turn computed (the rest came from the cache)
    seconds: float
    dropped: int = 0  # oldest messages dropped to fit the context
    finish_reason: str = "stop"  # stop, or length (max_new_tokens reached)


@dataclass
class ChatSession:
    """One conversation with a model, its key/value cache kept from turn to turn."""

    model: ChatModel
    params: SamplingParams
    max_new_tokens: int = 256
    system: str | None = None
    seed: int = 0
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        config = self.model.loaded.model.config
        dtype = self.model.loaded.amp_dtype or next(self.model.loaded.model.parameters()).dtype
        self.cache = KVCache(config, 1, config.block_size, self.model.loaded.device, dtype)
        self.cached: list[int] = []  # the ids whose keys and values the cache holds, in order
        self.generator = torch.Generator().manual_seed(self.seed)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cached = []
        self.cache.reset()

    def say(self, text: str, on_text: Callable[[str], None] = lambda piece: None) -> Reply:
        """Add a user message, generate the assistant's reply (streamed to ``on_text``), keep both."""
        start = time.perf_counter()
        room = min(self.max_new_tokens, max(self.model.context // 4, 1))
        messages, ids, dropped = fit_messages(self.model, self.messages + [{"role": "user", "content": text}], room)
        prefilled, logits = self._prefill(ids)
        stream = TextStream(self.model.loaded.tokenizer, [], on_text)
        produced, finish = 0, "length"
        for token in self._decode(logits):
            produced += 1
            if token in self.model.stop_ids:
                finish = "stop"
                break
            stream.add(token)
        reply = stream.finish()
        self.messages = messages + [{"role": "assistant", "content": reply}]
        return Reply(reply, produced, prefilled, time.perf_counter() - start, dropped, finish)

    @torch.inference_mode()
    def _prefill(self, ids: list[int]) -> tuple[int, torch.Tensor]:
        """Feed the ids the cache does not hold yet; the logits for what follows them."""
        common = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one id is fed: its logits start the reply
        self.cache.pos = common  # what follows is overwritten
        self.cached = list(ids)
        new = torch.tensor([ids[common:]], dtype=torch.long, device=self.model.loaded.device)
        return len(ids) - common, self._forward(new)

    def _forward(self, idx: torch.Tensor) -> torch.Tensor:
        loaded = self.model.loaded
        with autocast(loaded.device, loaded.amp_dtype):
            logits, _ = loaded.model(idx, cache=self.cache)
        return logits[:, -1, :]

    @torch.inference_mode()
    def _decode(self, logits: torch.Tensor) -> Iterator[int]:
        for _ in range(self.max_new_tokens):
            token = next_token(logits, self.params, self.generator)
            value = int(token[0, 0])
            yield value
            if value in self.model.stop_ids or self.cache.pos >= self.cache.length:
                return
            self.cached.append(value)
            logits = self._forward(token.view(1, 1))


# --------------------------------------------------------------------------------------------
# lmtrain chat
# --------------------------------------------------------------------------------------------


@dataclass
class ChatOptions:
    checkpoint: str = "best"
    system: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    seed: int | None = None
    device: str = "auto"


def open_session(path, options: ChatOptions) -> ChatSession:
    """A conversation with the run's checkpoint (or the model at ``path``), the sampling settings
    of its config's sample section under the options given (checked by the same schema)."""
    from lmtrain.inference import load_model
    from lmtrain.sample import SampleOptions, resolve_options

    loaded = load_model(path, options.checkpoint, options.device)
    cfg = resolve_options(loaded.config.sample, SampleOptions(
        max_new_tokens=options.max_new_tokens, temperature=options.temperature, top_k=options.top_k,
        top_p=options.top_p, seed=options.seed))
    params = SamplingParams(temperature=0.0 if options.greedy else cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    seed = cfg.seed if cfg.seed is not None else loaded.config.run.seed
    return ChatSession(ChatModel.of(loaded), params, cfg.max_new_tokens, options.system, seed)


COMMANDS = {"/reset": "forget the conversation (the system prompt stays)", "/exit": "leave"}


def chat_loop(session: ChatSession, read: Callable[[], str | None], write: Callable[[str], None],
              note: Callable[[str], None], interactive: bool) -> int:
    """Read user messages until the input ends or ``/exit``; write each reply as it streams.
    ``/reset`` starts over. Interactive, blank lines are ignored; otherwise each input line is one
    message and each reply is written as it is, then a newline (statistics go to ``note``).
    Returns the turns."""
    turns = 0
    while True:
        line = read()
        if line is None:
            return turns
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            return turns
        if text.strip() == "/reset":
            session.reset()
            note("[conversation reset]")
            continue
        if not text.strip() and interactive:
            continue
        reply = session.say(text, write)
        write("\n")
        turns += 1
        if reply.dropped:
            note(f"[the conversation outgrew the context of {session.model.context} tokens: the oldest "
                 f"{reply.dropped} message(s) were dropped, the system prompt kept]")
        note(f"[{reply.tokens} tokens in {reply.seconds:.2f}s, {reply.tokens / max(reply.seconds, 1e-9):,.1f} "
             f"tokens/s; {reply.prefilled} prompt tokens computed{'; cut at max_new_tokens' if reply.finish_reason == 'length' else ''}]")
