"""Continuous batching: many requests decoded together, one token each per step (`lmtrain serve`).

The engine owns a key/value cache of ``slots`` sequences (``SlotCache``). A request waits in a
bounded queue; between two steps it takes a free slot and its prompt is prefilled there alone;
then every step feeds each running request its last token, all slots in one forward pass, each at
its own position and attending to its own slot only. A request leaves its slot the step it ends
(a stop token, a stop string, its token limit, the end of the context, or its client gone), and
the next waiting request takes the slot before the following step. So a short request never waits
for a long one to finish, and the model's weights are read once per step for all of them: on a
CPU or a GPU a step of 8 costs little more than a step of 1.

The engine runs on a thread of its own; ``submit`` and ``cancel`` are safe from any thread, and a
request hears back through its ``emit(kind, value)`` callback: ``("text", piece)`` as text is
decoded (whole characters, stop strings held back) and finally ``("done", finish_reason)``.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from lmtrain.device import autocast
from lmtrain.errors import LmtrainError
from lmtrain.generate import SamplingParams, next_token
from lmtrain.sample import TextStream

log = logging.getLogger(__name__)


class QueueFull(LmtrainError):
    """Every slot is busy and the waiting queue is at its bound."""


class SlotCache:
    """Keys and values of ``slots`` sequences of up to ``length`` positions, each at its own position.

    Two views of it follow the cache protocol of ``GPT.hidden_states`` (``lmtrain.kvcache``):
    ``prefill(slot)`` for one sequence's prompt, ``step(active)`` for one token of every slot."""

    def __init__(self, config, slots: int, length: int, device, dtype) -> None:
        shape = (slots, config.kv_heads, length, config.head_size)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length, self.device = length, device
        self.pos = torch.zeros(slots, dtype=torch.long)  # positions filled, per slot (host)

    def prefill(self, slot: int) -> "_Prefill":
        return _Prefill(self, slot)

    def step(self, active: torch.Tensor) -> "_Step":
        return _Step(self, active)


class _Prefill:
    def __init__(self, cache: SlotCache, slot: int) -> None:
        self.cache, self.slot = cache, slot

    def begin(self, T: int, device) -> torch.Tensor:
        return torch.arange(T, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        T = k.size(2)
        self.cache.keys[layer][self.slot, :, :T] = k[0]
        self.cache.values[layer][self.slot, :, :T] = v[0]
        return k, v, None, True

    def advance(self, T: int) -> None:
        self.cache.pos[self.slot] = T


class _Step:
    """One new token per slot: written at the slot's position; attention sees the slot's filled
    positions only (a free slot computes on, harmlessly, at position 0)."""

    def __init__(self, cache: SlotCache, active: torch.Tensor) -> None:
        self.cache = cache
        pos = torch.where(active, cache.pos, torch.zeros_like(cache.pos))
        self.pos = pos.to(cache.device)
        span = int(pos.max()) + 1  # attention needs no key past the longest sequence
        self.span = span
        self.mask = (torch.arange(span, device=cache.device)[None, :] <= self.pos[:, None])[:, None, None, :]
        self.rows = torch.arange(len(pos), device=cache.device)

    def begin(self, T: int, device) -> torch.Tensor:
        return self.pos[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[self.rows, :, self.pos] = k[:, :, 0]
        values[self.rows, :, self.pos] = v[:, :, 0]
        return keys[:, :, :self.span], values[:, :, :self.span], self.mask, False

    def advance(self, T: int) -> None:
        pass


@dataclass
class Job:
    """One request: its prompt ids and sampling settings, and where its output goes."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    emit: Callable[[str, object], None]
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None
    cancelled: bool = False
    completion_tokens: int = 0
    finish_reason: str | None = None
    text: str = ""


class BatchEngine:
    def __init__(self, model, tokenizer, stop_ids: frozenset, amp_dtype, slots: int = 8, queue_size: int = 32,
                 context: int | None = None) -> None:
        self.model, self.tokenizer, self.stop_ids, self.amp_dtype = model, tokenizer, stop_ids, amp_dtype
        self.device = next(model.parameters()).device
        self.context = min(context or model.config.block_size, model.config.block_size)
        dtype = amp_dtype or next(model.parameters()).dtype
        self.cache = SlotCache(model.config, slots, self.context, self.device, dtype)
        self.slots, self.queue_size = slots, queue_size
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: dict[int, Job] = {}
        self._state: dict[int, tuple[int, TextStream, torch.Generator]] = {}  # slot -> (next token, text, rng)
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="lmtrain-batch-engine", daemon=True)
        self.steps = 0  # batched decoding steps so far (for tests and statistics)
        self.max_batch = 0  # the most requests decoded in one step

    def start(self) -> "BatchEngine":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        if len(job.prompt_ids) >= self.context:
            raise LmtrainError(f"the prompt is {len(job.prompt_ids)} tokens; the context is {self.context}")
        with self._wake:
            # Requests arriving together wait a moment for free slots; beyond those, queue_size more.
            if len(self.waiting) >= self.queue_size + self.slots - len(self.running):
                raise QueueFull(f"the server is busy: {len(self.running)} requests decoding and "
                                f"{len(self.waiting)} waiting; try again shortly")
            self.waiting.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: its slot is freed before the next step (or it never gets one)."""
        job.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def load(self) -> tuple[int, int]:
        return len(self.running), len(self.waiting)

    # ---------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.waiting and not self.running:
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self._admit()
                if self.running:
                    self._step()
            except Exception as exc:  # a bug must not hang every client: end them all with an error
                log.exception("serve: the batch engine failed")
                for slot in list(self.running):
                    self._finish(slot, "error")
                while self.waiting:
                    self.waiting.popleft().emit("done", f"error: {exc}")
        for slot in list(self.running):
            self._finish(slot, "cancelled")

    def _admit(self) -> None:
        while len(self.running) < self.slots:
            with self._wake:
                if not self.waiting:
                    return
                job = self.waiting.popleft()
            if job.cancelled:
                job.emit("done", "cancelled")
                continue
            slot = next(s for s in range(self.slots) if s not in self.running)
            self.running[slot] = job
            generator = torch.Generator().manual_seed(job.seed if job.seed is not None else
                                                      int(torch.randint(0, 2**62, ()).item()))
            stream = TextStream(self.tokenizer, job.stop_strings, lambda piece, job=job: job.emit("text", piece))
            ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=self.device)
            with torch.inference_mode(), autocast(self.device, self.amp_dtype):
                logits, _ = self.model(ids, cache=self.cache.prefill(slot))
            self._state[slot] = (0, stream, generator)
            self._take(slot, next_token(logits[:, -1, :], job.params, generator))

    @torch.inference_mode()
    def _step(self) -> None:
        for slot in [s for s, job in self.running.items() if job.cancelled]:
            self._finish(slot, "cancelled")
        if not self.running:
            return
        tokens = torch.zeros((self.slots, 1), dtype=torch.long)
        active = torch.zeros(self.slots, dtype=torch.bool)
        for slot in self.running:
            tokens[slot, 0] = self._state[slot][0]
            active[slot] = True
        view = self.cache.step(active)
        with autocast(self.device, self.amp_dtype):
            logits, _ = self.model(tokens.to(self.device), cache=view)
        self.cache.pos += active.long()
        self.steps += 1
        self.max_batch = max(self.max_batch, len(self.running))
        for slot in list(self.running):
            job = self.running[slot]
            self._take(slot, next_token(logits[slot:slot + 1, -1, :], job.params, self._state[slot][2]))

    def _take(self, slot: int, token: torch.Tensor) -> None:
        """The slot's new token: the end of its reply, or text, and the token fed next step."""
        job = self.running[slot]
        value = int(token[0, 0])
        _, stream, generator = self._state[slot]
        job.completion_tokens += 1
        if value in self.stop_ids:
            return self._finish(slot, "stop")
        if stream.add(value):
            return self._finish(slot, "stop")
        if job.completion_tokens >= job.max_new_tokens or int(self.cache.pos[slot]) >= self.context:
            return self._finish(slot, "length")
        self._state[slot] = (value, stream, generator)

    def _finish(self, slot: int, reason: str) -> None:
        job = self.running.pop(slot)
        _, stream, _ = self._state.pop(slot)
        if reason != "cancelled":
            job.text = stream.finish()
        self.cache.pos[slot] = 0
        job.finish_reason = reason
        job.emit("done", reason)
