"""The data a training run reads: the run's shards (``RunData``), and training and validation
batches read straight from them, memmapped.

A training batch is ``batch_size`` windows of ``block_size + 1`` tokens (inputs and targets
shifted by one), at random offsets. The offsets are a pure function of (seed, step, micro-batch)
where the micro-batch index counts across ranks (``micro * world_size + rank``): resuming needs no
loader state, every rank reads different data, and N ranks with grad_accum G read exactly what
one process with grad_accum N*G reads.

``SyntheticBatches`` gives uniform random tokens in the same form, for benchmarks and tests that
need no shards.

Validation reads a fixed set of windows, evenly spaced over the val split, the same at every
evaluation, so val curves are comparable from point to point.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmtrain.errors import LmtrainError, ShardError
from lmtrain.fsutil import sha256_file
from lmtrain.packing import ConversationBatches, Conversations, mixture_parts
from lmtrain.rundir import data_dir, tokenizer_path
from lmtrain.shards import Manifest, check_shards_agree, open_split, out_of_vocabulary, read_manifest
from lmtrain.tokenizer import check_tokenizer_agrees


class TokenWindows:
    """Random access to windows of ``window`` consecutive tokens of one split.

    A window never crosses a shard boundary, so each is one slice of one memmap.
    """

    def __init__(self, data_dir: Path, split: str, window: int, tokenizer_sha256: str | None = None):
        self.split, self.window = split, window
        self.shards = open_split(data_dir, split, tokenizer_sha256)
        self.vocab_size = read_manifest(data_dir).vocab_size
        starts = np.array([max(len(s) - window + 1, 0) for s in self.shards], dtype=np.int64)
        if starts.sum() == 0:
            longest = max(len(s) for s in self.shards)
            raise ShardError(
                f"the {split} split has no window of {window} tokens (its longest shard holds "
                f"{longest}): lower model.block_size to at most {longest - 1}, or give the "
                f"{split} split more data (data.val_fraction, data.val_source)"
            )
        self.cum_starts = np.concatenate([[0], np.cumsum(starts)])
        self.num_windows = int(self.cum_starts[-1])  # distinct start positions

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    def windows(self, positions: np.ndarray) -> np.ndarray:
        """Windows at global start positions in [0, num_windows): an int64 array (n, window)."""
        shard_idx = np.searchsorted(self.cum_starts, positions, side="right") - 1
        out = np.empty((len(positions), self.window), dtype=np.int64)
        for row, (s, pos) in enumerate(zip(shard_idx, positions)):
            offset = int(pos - self.cum_starts[s])
            out[row] = self.shards[s][offset : offset + self.window]
        if out.size and out.max() >= self.vocab_size:
            # Header, size and manifest were fine, yet a token id is out of range: the file's
            # content changed (a bit flip, an edit). Cheap to check per batch; fatal to index with.
            row = int(np.argmax(out.max(axis=1) >= self.vocab_size))
            raise out_of_vocabulary(self.shards[shard_idx[row]].filename, int(out[row].max()), self.vocab_size)
        return out


def micro_batch_positions(windows: TokenWindows, seed: int, step: int, micro_index: int,
                          batch_size: int) -> np.ndarray:
    """Start positions of one micro-batch: a pure function of its arguments."""
    rng = np.random.default_rng([seed, step, micro_index])
    return rng.integers(0, windows.num_windows, size=batch_size)


def to_device(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split windows into inputs and targets; pinned, non-blocking copies on CUDA."""
    tokens = torch.from_numpy(windows)
    x, y = tokens[:, :-1], tokens[:, 1:]
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)


class TrainBatches:
    """The training stream: ``get(step, micro)`` for this rank."""

    def __init__(self, windows: TokenWindows, seed: int, batch_size: int, rank: int, world_size: int,
                 device: torch.device):
        self.windows, self.seed, self.batch_size = windows, seed, batch_size
        self.rank, self.world_size, self.device = rank, world_size, device

    @property
    def epoch_tokens(self) -> int:
        """Tokens in one pass over the training split: what epochs are counted in."""
        return self.windows.tokens

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = micro * self.world_size + self.rank
        positions = micro_batch_positions(self.windows, self.seed, step, index, self.batch_size)
        return to_device(self.windows.windows(positions), self.device)


class SyntheticBatches:
    """Uniform random tokens over ``vocab``, a pure function of (step, micro): ``get`` like
    ``TrainBatches``, for timing the training step without a corpus."""

    def __init__(self, vocab: int, batch_size: int, block_size: int, device: torch.device) -> None:
        self.vocab, self.batch_size, self.block_size, self.device = vocab, batch_size, block_size, device

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(step * 1000 + micro)
        tokens = torch.randint(0, self.vocab, (self.batch_size, self.block_size + 1), generator=g)
        if self.device.type == "cuda":
            tokens = tokens.pin_memory().to(self.device, non_blocking=True)
        else:
            tokens = tokens.to(self.device)
        return tokens[:, :-1], tokens[:, 1:]


def val_positions(windows: TokenWindows, count: int) -> np.ndarray:
    """``count`` start positions spread evenly over the val split (non-overlapping when it can)."""
    if count >= windows.num_windows:
        return np.arange(windows.num_windows, dtype=np.int64)
    return np.linspace(0, windows.num_windows - 1, count).round().astype(np.int64)


@dataclass
class RunData:
    """What training reads from the run directory, checked before anything is written: the
    tokenizer's hash, the shards' manifest, and the train and val splits as windows of
    ``model.block_size + 1`` tokens, or (chat shards) as conversations (``lmtrain.packing``)."""

    tokenizer_sha256: str
    manifest: Manifest
    train: "TokenWindows | Conversations"
    val: "TokenWindows | Conversations"
    packing: str = "pack"
    grad_accum: int = 1

    @classmethod
    def open(cls, config) -> "RunData":
        tok_file = tokenizer_path(config.run_dir)
        if not tok_file.exists():
            raise LmtrainError(f"no tokenizer at {tok_file}; run `lmtrain tokenize` and `lmtrain shard` first")
        check_tokenizer_agrees(config)
        sha = sha256_file(tok_file)
        check_shards_agree(config, sha)
        directory = data_dir(config.run_dir)
        manifest = read_manifest(directory)
        # TokenWindows (open_split) refuses shards made with another tokenizer.
        window = config.model.block_size + 1
        if manifest.masked != (config.data.format == "chat"):
            raise ShardError(f"{directory}: the shards hold {'conversations' if manifest.masked else 'text'} but "
                             f"data.format is {config.data.format}; re-run `lmtrain shard --force`")
        if manifest.masked:
            text_parts, weights = mixture_parts(config.data)
            return cls(sha, manifest, Conversations(directory, "train", window, config.data.too_long, sha,
                                                    text_parts, weights),
                       Conversations(directory, "val", window, "cut", sha, text_parts), config.data.packing,
                       config.train.grad_accum)
        return cls(sha, manifest, TokenWindows(directory, "train", window, sha),
                   TokenWindows(directory, "val", window, sha))

    @property
    def chat(self) -> bool:
        return isinstance(self.train, Conversations)

    @property
    def epoch_tokens(self) -> int:
        """Tokens one pass over the training data gives (conversations: packed row positions)."""
        return self.train.epoch_tokens(self.packing) if self.chat else self.train.tokens

    def train_batches(self, seed: int, batch_size: int, rank: int, world_size: int,
                      device: torch.device) -> "TrainBatches | ConversationBatches":
        if self.chat:
            return ConversationBatches(self.train, seed, batch_size, self.grad_accum, rank, world_size,
                                       self.packing, device)
        return TrainBatches(self.train, seed, batch_size, rank, world_size, device)
