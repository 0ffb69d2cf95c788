"""Batches of conversations (``data.format: chat``): whole conversations packed into rows, the loss
only where the shards' mask says.

Text trains on random windows of one token stream; a conversation must not be cut at a random
place nor run into the next one. So a chat split is read as its conversations (``Conversations``:
where each starts in the shards, from the mask's start flags), and each epoch shuffles them and
packs them, whole and in that order, into rows of ``block_size + 1`` tokens (``data.packing:
pack``), or puts each in a row of its own (``pad``). In a packed row each conversation has its
own positions (from 0) and attends only to itself (``PackedLayout``), so a packed row computes
exactly what the same conversations would in rows of their own; only the padding differs.

Targets the loss must skip are ``IGNORE`` (-100, PyTorch's and transformers' ignore index): the
template's glue, the user's and system's turns, the first token of each conversation, padding.

The row stream is a pure function of (seed, epoch): batch ``(step, micro)`` of rank ``rank`` takes
the rows numbered ``(step * grad_accum + micro) * world_size + rank``, ``batch_size`` of them, so
resuming needs no loader state and N ranks with grad_accum G read what one process with N * G
reads. Epochs follow one another in the stream; each is reshuffled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmtrain.errors import ShardError
from lmtrain.kvcache import FixedLayout
from lmtrain.shards import CONVERSATION_START, PART_SHIFT, TRAINED, open_masks, open_split, out_of_vocabulary, read_manifest

IGNORE = -100


def mixture_parts(data) -> tuple[frozenset, list[float] | None]:
    """From a ``DataConfig``: which ``data.mixture`` sources are text, and the sources' weights."""
    mixture = data.mixture
    text_parts = frozenset(i for i, e in enumerate(mixture) if (e.format or data.format) == "text")
    return text_parts, ([e.weight for e in mixture] if mixture else None)


class Conversations:
    """The conversations of one split, as (shard, start, length), cut to ``window`` tokens or left
    out when longer (``data.too_long``), and left out when nothing in them is trained.

    With a ``data.mixture``: ``text_parts`` are the sources whose documents are text (a long one
    is tiled into windows, not cut), and ``weights`` how often each source's records come per epoch."""

    def __init__(self, directory: Path, split: str, window: int, too_long: str = "cut",
                 tokenizer_sha256: str | None = None, text_parts: frozenset = frozenset(),
                 weights: list[float] | None = None) -> None:
        self.split, self.window, self.too_long_policy = split, window, too_long
        self.tokens_of = open_split(directory, split, tokenizer_sha256)
        self.flags_of = open_masks(directory, split)
        if self.flags_of is None:
            raise ShardError(f"{directory}: text shards; data.format chat needs conversation shards: "
                             "re-run `lmtrain shard --force`")
        self.vocab_size = read_manifest(directory).vocab_size
        self.weights = weights
        self._row_counts: dict[str, int] = {}
        shard, start, length, trained, part = [], [], [], [], []
        for s, flags in enumerate(self.flags_of):
            starts = np.flatnonzero(flags & CONVERSATION_START)
            ends = np.append(starts[1:], len(flags))
            parts = np.asarray(flags[starts] >> PART_SHIFT, dtype=np.int64)
            if text_parts:
                starts, ends, parts = _tile_text(starts, ends, parts, text_parts, window)
            # trained targets of each conversation within its first `window` tokens (its first
            # token is never a target)
            cum = np.concatenate([[0], np.cumsum(flags & TRAINED, dtype=np.int64)])
            stop = np.minimum(ends, starts + window)
            shard.append(np.full(len(starts), s))
            start.append(starts)
            length.append(ends - starts)
            trained.append(cum[stop] - cum[np.minimum(starts + 1, stop)])
            part.append(parts)
        shard, start, length, trained, part = (np.concatenate(a).astype(np.int64)
                                               for a in (shard, start, length, trained, part))
        long = length > window
        keep = trained > 0
        if too_long == "skip":
            keep &= ~long
        self.total = len(length)
        self.too_long = int(long.sum())  # cut, or skipped with too_long skip
        self.untrained = int((trained == 0).sum())
        self.shard, self.start, self.part = shard[keep], start[keep], part[keep]
        self.length = np.minimum(length[keep], window)
        if len(self.length) == 0:
            raise ShardError(f"the {split} split has no conversation with a trained token within "
                             f"model.block_size + 1 = {window} tokens")

    def __len__(self) -> int:
        return len(self.length)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, a, n = int(self.shard[i]), int(self.start[i]), int(self.length[i])
        return np.asarray(self.tokens_of[s][a:a + n], dtype=np.int64), np.asarray(self.flags_of[s][a:a + n])

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The conversations of one epoch, shuffled: with mixture weights, each source's records
        ``weight`` times (the fraction as a random subset, drawn anew each epoch)."""
        rng = np.random.default_rng([seed, epoch])
        if not self.weights:
            return rng.permutation(len(self))
        chosen = []
        for p, weight in enumerate(self.weights):
            members = np.flatnonzero(self.part == p)
            whole, fraction = int(weight), weight - int(weight)
            chosen += [members] * whole
            if fraction > 0 and len(members):
                chosen.append(rng.choice(members, size=int(round(fraction * len(members))), replace=False))
        order = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
        return rng.permutation(order)

    def epoch_tokens(self, packing: str) -> int:
        """Row positions one epoch fills: what a run's tokens per step are counted against."""
        return self.packed_rows(packing) * (self.window - 1)

    def packed_rows(self, packing: str) -> int:
        """Rows one epoch fills (its first, where mixture weights draw a subset); counted once."""
        if packing not in self._row_counts:
            self._row_counts[packing] = len(self.rows(self.epoch_order(0, 0), packing))
        return self._row_counts[packing]

    def rows(self, order: np.ndarray, packing: str) -> list[np.ndarray]:
        """Conversations in ``order`` grouped into rows: greedily, whole, up to ``window`` tokens
        each (``pack``), or one per row (``pad``)."""
        if packing == "pad":
            return [order[i:i + 1] for i in range(len(order))]
        rows, current, used = [], [], 0
        for i in order:
            n = int(self.length[i])
            if current and used + n > self.window:
                rows.append(np.asarray(current))
                current, used = [], 0
            current.append(i)
            used += n
        if current:
            rows.append(np.asarray(current))
        return rows


def _tile_text(starts, ends, parts, text_parts, window: int):
    """A text document longer than ``window`` becomes consecutive pieces of ``window`` tokens (each
    packed like a conversation of its own), instead of losing all but its first window."""
    new_starts, new_ends, new_parts = [], [], []
    for a, b, p in zip(starts.tolist(), ends.tolist(), parts.tolist()):
        if p in text_parts and b - a > window:
            pieces = list(range(a, b, window))
            new_starts += pieces
            new_ends += [min(x + window, b) for x in pieces]
            new_parts += [p] * len(pieces)
        else:
            new_starts.append(a), new_ends.append(b), new_parts.append(p)
    return (np.asarray(new_starts, dtype=np.int64), np.asarray(new_ends, dtype=np.int64),
            np.asarray(new_parts, dtype=np.int64))


@dataclass
class Row:
    tokens: np.ndarray  # (window,) ids, padding 0
    targets: np.ndarray  # (window - 1,) the next id where it is trained, else IGNORE
    positions: np.ndarray  # (window - 1,) each conversation's own positions
    segments: np.ndarray  # (window - 1,) which conversation of the row; -1 for padding


def build_row(conversations: Conversations, members: np.ndarray) -> Row:
    window = conversations.window
    tokens = np.zeros(window, dtype=np.int64)
    flags = np.zeros(window, dtype=np.uint8)
    segments = np.full(window, -1, dtype=np.int64)
    positions = np.zeros(window, dtype=np.int64)
    at = 0
    for k, i in enumerate(members):
        ids, f = conversations.read(int(i))
        n = len(ids)
        tokens[at:at + n], flags[at:at + n], segments[at:at + n] = ids, f, k
        positions[at:at + n] = np.arange(n)
        at += n
    if tokens.max() >= conversations.vocab_size:
        raise out_of_vocabulary(f"the {conversations.split} split", int(tokens.max()), conversations.vocab_size)
    # A target counts when it is trained and belongs to the same conversation as its input.
    trained = ((flags[1:] & TRAINED) > 0) & (segments[1:] == segments[:-1]) & (segments[:-1] >= 0)
    targets = np.where(trained, tokens[1:], IGNORE)
    return Row(tokens, targets, positions[:-1], segments[:-1])


class PackedLayout(FixedLayout):
    """What attention may see in packed rows, in the protocol ``GPT.hidden_states`` follows for
    a cache (``lmtrain.kvcache``): each position sees the earlier positions of its own
    conversation only, at that conversation's own positions."""

    def __init__(self, positions: torch.Tensor, segments: torch.Tensor) -> None:
        same = segments[:, :, None] == segments[:, None, :]
        causal = positions[:, None, :] <= positions[:, :, None]
        super().__init__(positions, (same & causal)[:, None])  # (B, 1, T, T)


def to_batch(rows: list[Row], packing: str, device: torch.device):
    """(inputs, targets, layout) on ``device``; the layout is None for one conversation per row,
    where plain causal attention already is exact (padding only follows)."""
    x = torch.from_numpy(np.stack([r.tokens[:-1] for r in rows])).to(device)
    y = torch.from_numpy(np.stack([r.targets for r in rows])).to(device)
    if packing == "pad":
        return x, y, None
    positions = torch.from_numpy(np.stack([r.positions for r in rows])).to(device)
    segments = torch.from_numpy(np.stack([r.segments for r in rows])).to(device)
    return x, y, PackedLayout(positions, segments)


class ConversationBatches:
    """The training stream of a chat run: ``get(step, micro)`` -> (x, y, layout) for this rank."""

    def __init__(self, conversations: Conversations, seed: int, batch_size: int, grad_accum: int, rank: int,
                 world_size: int, packing: str, device: torch.device) -> None:
        self.conversations, self.seed, self.batch_size = conversations, seed, batch_size
        self.grad_accum, self.rank, self.world_size = grad_accum, rank, world_size
        self.packing, self.device = packing, device
        self._epoch_rows: list[int] = []  # rows in each epoch packed so far
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def epoch_rows(self, epoch: int) -> list[np.ndarray]:
        if self._cached is None or self._cached[0] != epoch:
            order = self.conversations.epoch_order(self.seed, epoch)
            self._cached = (epoch, self.conversations.rows(order, self.packing))
        return self._cached[1]

    @property
    def epoch_tokens(self) -> int:
        return self.conversations.epoch_tokens(self.packing)

    def locate(self, row: int) -> tuple[int, int]:
        """(epoch, index in it) of the ``row``-th row of the stream."""
        epoch, first = 0, 0
        while True:
            if epoch == len(self._epoch_rows):
                self._epoch_rows.append(len(self.epoch_rows(epoch)))
            if row < first + self._epoch_rows[epoch]:
                return epoch, row - first
            first += self._epoch_rows[epoch]
            epoch += 1

    def epochs_at(self, step: int) -> float:
        """Epochs over the training conversations completed by the end of ``step``."""
        rows = (step + 1) * self.grad_accum * self.world_size * self.batch_size
        epoch, index = self.locate(rows)
        return epoch + index / max(self._epoch_rows[epoch], 1)

    def get(self, step: int, micro: int):
        first = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.batch_size
        rows = []
        for r in range(first, first + self.batch_size):
            epoch, index = self.locate(r)
            rows.append(build_row(self.conversations, self.epoch_rows(epoch)[index]))
        return to_batch(rows, self.packing, self.device)


def val_rows(conversations: Conversations, count: int, packing: str) -> list[np.ndarray]:
    """The fixed rows an evaluation scores: the split's conversations in order, packed, ``count``
    rows spread evenly over them (all when there are fewer)."""
    rows = conversations.rows(np.arange(len(conversations)), packing)
    if count >= len(rows):
        return rows
    picks = np.linspace(0, len(rows) - 1, count).round().astype(np.int64)
    return [rows[i] for i in picks]
