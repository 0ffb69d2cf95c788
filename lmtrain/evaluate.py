"""Loss, perplexity and bits per byte: of a checkpoint on a corpus (`lmtrain eval`), and of the
model being trained on the val split (``Validator``, the training loop's evaluation).

``bits_per_byte`` and ``perplexity`` are the one definition both use. In `lmtrain eval` every token of the text is scored exactly once: the token stream is cut into consecutive windows
of ``block_size + 1`` tokens that overlap by one (the last target of a window is the first input
of the next). Bits per byte divide the summed loss by the text's UTF-8 bytes, so the number does
not depend on the tokenizer and models with different vocabularies compare.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from lmtrain import distributed as dist_util
from lmtrain.data import TokenWindows, to_device, val_positions
from lmtrain.device import autocast
from lmtrain.inference import LoadedModel, load_model
from lmtrain.loss import IGNORE_INDEX, eval_loss_fn
from lmtrain.rundir import data_dir
from lmtrain.shards import open_split, out_of_vocabulary, read_manifest


def bits_per_byte(total_nats: float, utf8_bytes: int) -> float:
    """Summed loss (nats) over the UTF-8 bytes of the text it was measured on, in bits: a number
    that does not depend on the tokenizer, so models with different vocabularies compare."""
    return total_nats / utf8_bytes / math.log(2)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: an untrained model's loss must not overflow


def val_metrics(loss: float, tokens: int, utf8_bytes: int) -> dict[str, float]:
    """val_loss, val_ppl and val_bpb of a mean loss over a split of ``tokens`` and ``utf8_bytes``."""
    return {"val_loss": loss, "val_ppl": perplexity(loss), "val_bpb": bits_per_byte(loss * tokens, utf8_bytes)}


def val_loss(model: torch.nn.Module, windows: TokenWindows, positions: np.ndarray, batch_size: int,
             device: torch.device, amp_dtype: torch.dtype | None,
             info: dist_util.DistInfo | None = None) -> float:
    """Mean loss of ``model`` over the windows at ``positions`` (each rank scores its share)."""
    def batches(mine):
        for i in range(0, len(mine), batch_size):
            x, y = to_device(windows.windows(mine[i : i + batch_size]), device)
            yield x, y, None, len(x)  # every window counts the same

    return _mean_loss(model, batches, positions, device, amp_dtype, info)


def conversation_val_loss(model: torch.nn.Module, conversations, rows: list, batch_size: int, packing: str,
                          device: torch.device, amp_dtype: torch.dtype | None,
                          info: dist_util.DistInfo | None = None) -> float:
    """Mean loss per trained token of ``model`` over the packed conversation ``rows``."""
    from lmtrain.packing import build_row, to_batch

    def batches(mine):
        for i in range(0, len(mine), batch_size):
            x, y, layout = to_batch([build_row(conversations, members) for members in mine[i:i + batch_size]],
                                    packing, device)
            yield x, y, layout, (y != IGNORE_INDEX).sum()  # a batch counts by its trained tokens

    return _mean_loss(model, batches, rows, device, amp_dtype, info)


@torch.no_grad()
def _mean_loss(model, batches, items, device, amp_dtype, info) -> float:
    """The weighted mean of the batch losses ``batches(this rank's share of items)`` yields, over
    every rank."""
    info = info or dist_util.DistInfo()
    loss_fn = eval_loss_fn(device)
    model.eval()
    total = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for x, y, layout, weight in batches(items[info.rank :: info.world_size]):
        with autocast(device, amp_dtype):
            _, loss = model(x, y, loss_fn=loss_fn, **({"layout": layout} if layout is not None else {}))
        total += loss.float() * weight
        count += weight
    model.train()
    if info.enabled:
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    return (total / count.clamp(min=1)).item()


class Validator:
    """The evaluation the training loop runs, every ``train.eval_every`` steps and at every
    checkpoint (``due``): the val loss over a fixed set of windows spread over the val split (the
    same at every evaluation, so the curve compares point to point), with its perplexity and bits
    per byte, and the multiple-choice ``tasks`` of ``train.eval_tasks`` (encoded ``lmtrain.tasks``
    tasks). Under torchrun each rank scores its share."""

    def __init__(self, model: torch.nn.Module, windows, tokens: int, utf8_bytes: int, tc,
                 device: torch.device, amp_dtype: torch.dtype | None, info: dist_util.DistInfo,
                 tasks: list | None = None, packing: str | None = None) -> None:
        """``windows``: the val split's ``TokenWindows``, or with ``packing`` its ``Conversations``
        (``tokens`` and ``utf8_bytes`` then count the trained tokens and their text only)."""
        self.model, self.windows, self.tokens, self.utf8_bytes = model, windows, tokens, utf8_bytes
        self.every, self.batch_size = tc.eval_every, tc.batch_size
        self.device, self.amp_dtype, self.info = device, amp_dtype, info
        self.tasks = tasks or []
        self.packing = packing
        if packing is None:
            self.positions = val_positions(windows, tc.eval_batches * tc.batch_size)
        else:
            from lmtrain.packing import val_rows

            self.positions = val_rows(windows, tc.eval_batches * tc.batch_size, packing)

    @property
    def micro_batches(self) -> int:
        """The micro-batches each rank scores in one evaluation."""
        return math.ceil(len(self.positions) / (self.batch_size * self.info.world_size))

    def due(self, step: int, saving: bool) -> bool:
        """Every ``train.eval_every`` steps, and with every checkpoint (each records its val loss)."""
        return step % self.every == 0 or saving

    def run(self) -> tuple[dict[str, float], list]:
        """The val metrics (val_loss, val_ppl, val_bpb) and each task's ``TaskScore``."""
        return val_metrics(self._loss(self.positions), self.tokens, self.utf8_bytes), self._score_tasks()

    def _loss(self, positions) -> float:
        if self.packing is not None:
            return conversation_val_loss(self.model, self.windows, positions, self.batch_size, self.packing,
                                         self.device, self.amp_dtype, self.info)
        return val_loss(self.model, self.windows, positions, self.batch_size, self.device, self.amp_dtype, self.info)

    def quietly(self, micro_batches: int | None = None) -> None:
        """An evaluation as the loop runs it, for timing it (lmtrain.timing); with ``micro_batches``,
        only that many of its micro-batches on each rank, and no tasks."""
        positions = self.positions
        if micro_batches is not None:
            positions = positions[: micro_batches * self.batch_size * self.info.world_size]
        self._loss(positions)
        if micro_batches is None:
            self._score_tasks()

    def _score_tasks(self) -> list:
        if not self.tasks:
            return []
        from lmtrain.tasks import score_task

        return [score_task(self.model, task, self.device, self.amp_dtype, self.batch_size, self.info)
                for task in self.tasks]


@dataclass
class EvalResult:
    source: str
    checkpoint: str
    step: int
    loss: float
    ppl: float
    bpb: float
    tokens: int
    bytes: int
    unigram_bpb: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(run_dir: Path, checkpoint: str = "best", data_source: str | None = None,
             device: str = "auto", batch_size: int = 8, max_tokens: int | None = None,
             gguf: Path | None = None) -> EvalResult:
    """Score a checkpoint on the run's val split, or on ``data_source`` (any ``data.source``);
    with ``gguf``, the weights of that GGUF export of the run instead (dequantized)."""
    if data_source is None and not (run_dir / "config.yaml").is_file():
        from lmtrain.errors import LmtrainError

        raise LmtrainError(f"{run_dir} is a model, not a run: it has no val split; give --data (your text) or --tasks")
    loaded = load_model(run_dir, checkpoint, device)
    if gguf is not None:
        from lmtrain.export import load_gguf_into

        load_gguf_into(loaded, gguf)
    if loaded.config.data.format == "chat" and loaded.tokenizer_dir is not None:
        return _evaluate_conversations(loaded, data_source, batch_size, max_tokens)
    unigram = None
    if data_source is None:
        manifest = read_manifest(data_dir(run_dir))
        stream = np.concatenate(open_split(data_dir(run_dir), "val", manifest.tokenizer_sha256))
        if stream.size and stream.max() >= manifest.vocab_size:
            raise out_of_vocabulary(f"{data_dir(run_dir)} (val split)", int(stream.max()), manifest.vocab_size)
        total_tokens = len(stream)
        n_bytes = manifest.splits["val"].utf8_bytes
        if max_tokens is not None and max_tokens < total_tokens:
            # A prefix of the split: scale its bytes by the share of tokens kept (an estimate).
            n_bytes = round(n_bytes * max_tokens / total_tokens)
            stream = stream[:max_tokens]
        unigram = manifest.unigram_byte_bpb()
        source = "val split"
    else:
        stream, n_bytes = _tokenize_source(loaded, data_source, max_tokens)
        source = data_source
    nll, scored = score_stream(loaded, np.asarray(stream, dtype=np.int64), batch_size)
    loss = nll / max(scored, 1)
    return EvalResult(source=source, checkpoint=str(gguf) if gguf is not None else loaded.checkpoint.name,
                      step=loaded.step, loss=loss,
                      ppl=perplexity(loss), bpb=bits_per_byte(nll, max(n_bytes, 1)),
                      tokens=scored, bytes=n_bytes, unigram_bpb=unigram)


def _evaluate_conversations(loaded: LoadedModel, data_source: str | None, batch_size: int,
                            max_tokens: int | None) -> EvalResult:
    """A chat run: the mean loss over the trained tokens only (the assistant's, as training saw
    them), each conversation scored on its own; bits per byte of the trained text."""
    from lmtrain.chat_template import load_template, special_tokens_of
    from lmtrain.config import DataConfig
    from lmtrain.conversations import encode, trained_text
    from lmtrain.corpus import check_sources, iter_documents
    from lmtrain.errors import DataError
    from lmtrain.shards import TRAINED

    window = loaded.model.config.block_size + 1
    pieces, n_bytes = [], 0
    if data_source is None:
        from lmtrain.packing import Conversations, mixture_parts

        directory = data_dir(loaded.checkpoint.parent.parent)
        split = Conversations(directory, "val", window, "cut", read_manifest(directory).tokenizer_sha256,
                              mixture_parts(loaded.config.data)[0])
        pieces = [split.read(i) for i in range(len(split))]
        n_bytes = read_manifest(directory).splits["val"].utf8_bytes
        source = "val split"
    else:
        data = DataConfig(**{**vars(loaded.config.data), "source": data_source, "val_source": None})
        check_sources(data)
        template = load_template(loaded.tokenizer_dir, loaded.tokenizer.id_to_token(loaded.eot_id))
        specials = special_tokens_of(loaded.tokenizer)
        loss_on = loaded.config.train.loss_on
        for doc in iter_documents(data_source, data):
            if doc.bad is not None:
                continue
            ids, mask = encode(loaded.tokenizer, template, doc.messages, specials, loss_on)
            pieces.append((ids[:window], mask[:window]))
            n_bytes += len(trained_text(template, doc.messages, loss_on).encode("utf-8", "surrogatepass"))
        if not pieces:
            raise DataError(f"--data {data_source}: no conversations")
        source = data_source
    total, scored = 0.0, 0
    model, device = loaded.model, loaded.device
    with torch.no_grad():
        for ids, flags in pieces:
            if max_tokens is not None and scored >= max_tokens:
                break
            x = torch.from_numpy(np.asarray(ids[:-1], dtype=np.int64))[None].to(device)
            targets = np.where((np.asarray(flags[1:]) & TRAINED) > 0, ids[1:], IGNORE_INDEX)
            y = torch.from_numpy(targets.astype(np.int64))[None].to(device)
            if not (y != IGNORE_INDEX).any():
                continue
            with autocast(device, loaded.amp_dtype):
                logits, _ = model(x)
            total += float(torch.nn.functional.cross_entropy(logits.float()[0], y[0], reduction="sum"))
            scored += int((y != IGNORE_INDEX).sum())
    loss = total / max(scored, 1)
    return EvalResult(source=source, checkpoint=loaded.checkpoint.name, step=loaded.step, loss=loss,
                      ppl=perplexity(loss), bpb=bits_per_byte(total, max(n_bytes, 1)), tokens=scored, bytes=n_bytes)


def _tokenize_source(loaded: LoadedModel, source: str, max_tokens: int | None) -> tuple[np.ndarray, int]:
    """All documents of ``source``, each after the tokenizer's BOS (where it has one) and followed
    by end-of-text, as one stream (the shards' layout); and their bytes."""
    from lmtrain.config import DataConfig
    from lmtrain.corpus import check_sources, iter_documents
    from lmtrain.errors import DataError

    data = DataConfig(**{**vars(loaded.config.data), "source": source, "val_source": None})
    check_sources(data)
    from tqdm.auto import tqdm

    pieces, n_bytes, count = [], 0, 0
    with tqdm(desc="eval: tokenizing", unit="doc", leave=False) as bar:
        for batch in _chunks(iter_documents(source, data), 256):
            for doc, enc in zip(batch, loaded.tokenizer.encode_batch_fast([d.text for d in batch],
                                                                          add_special_tokens=False)):
                pieces.append(np.asarray(loaded.bos + enc.ids + [loaded.eot_id], dtype=np.int64))
                n_bytes += len(doc.text.encode("utf-8", "surrogatepass"))
                count += len(pieces[-1])
            bar.update(len(batch))
            if max_tokens is not None and count >= max_tokens:
                break
    if not pieces:
        raise DataError(f"--data {source}: no non-empty documents")
    return np.concatenate(pieces), n_bytes


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def score_stream(loaded: LoadedModel, stream: np.ndarray, batch_size: int) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of every token of ``stream`` but the first."""
    model, device = loaded.model, loaded.device
    block = model.config.block_size
    from tqdm.auto import tqdm

    starts = list(range(0, max(len(stream) - 1, 0), block))
    total, scored = 0.0, 0
    for i in tqdm(range(0, len(starts), batch_size), desc="eval: scoring", unit="batch", leave=False):
        group = [stream[s : s + block + 1] for s in starts[i : i + batch_size]]
        for window in _same_length_groups(group):
            tokens = torch.from_numpy(np.stack(window)).to(device)
            x, y = tokens[:, :-1], tokens[:, 1:]
            with autocast(device, loaded.amp_dtype):
                logits, _ = model(x)
            nll = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
            total += float(nll)
            scored += y.numel()
    return total, scored


def _same_length_groups(windows: list[np.ndarray]) -> Iterator[list[np.ndarray]]:
    """Full windows together, the shorter last window on its own."""
    full = [w for w in windows if len(w) == len(windows[0])]
    rest = [w for w in windows if len(w) != len(windows[0])]
    if full:
        yield full
    for w in rest:
        if len(w) > 1:
            yield [w]
