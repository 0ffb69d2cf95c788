"""Multiple-choice tasks: `lmtrain eval --tasks` and ``train.eval_tasks``.

A task file is JSONL, one item per line, in either of two formats:

    HellaSwag's own (hellaswag_val.jsonl)  {"ctx": "...", "endings": ["...", ...], "label": 2}
    generic                                {"context": "...", "choices": ["...", ...], "label": 0}
                                           ("query" may stand for "context")

Each choice is scored by the log-likelihood the model gives it as a continuation of the context,
the way EleutherAI's lm-evaluation-harness scores a ``multiple_choice`` task, so that the numbers
agree item by item with the harness run on an export of the same checkpoint:

- the continuation is the choice after one space (the harness' ``target_delimiter``); whitespace
  at the end of the context moves to the start of the continuation;
- the context is tokenized alone, and context + continuation together; the continuation's tokens
  are the latter's beyond the context's length, so a word is tokenized as it follows the context
  (" cat" is one token where "cat" after a space would be two);
- an empty (or all-whitespace) context is the end-of-text token: in training every document
  starts after one;
- when context and continuation do not fit in ``block_size + 1`` tokens, the context is cut from
  the left for that choice (the items this happens to are counted: ``truncated``).

Three accuracies, each the share of items whose best-scoring choice is the label:

    acc              total log-likelihood of the continuation
    acc_norm         log-likelihood per UTF-8 byte of the choice: the harness' ``acc_bytes``. Its
                     ``acc_norm`` divides by characters, the same for ASCII text such as HellaSwag
    acc_norm_tokens  mean log-likelihood per token, i.e. lowest mean loss: llm.c's and nanochat's

Scoring packs an item into one sequence: the context once, then every choice after it, each
choice attending to the context and to itself only, its positions continuing from the context's
end. The context is computed once per item instead of once per choice, and the log-likelihoods
equal those of a separate forward pass per choice (tested).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch

from lmtrain import distributed as dist_util
from lmtrain.device import autocast
from lmtrain.errors import DataError
from lmtrain.fsdp import is_sharded
from lmtrain.kvcache import FixedLayout

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from lmtrain.model import GPT

DELIMITER = " "  # between the context and each choice (lm-evaluation-harness' target_delimiter)
METRICS = ("acc", "acc_norm", "acc_norm_tokens")


# --------------------------------------------------------------------------------------------
# Task files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    label: int
    line: int  # in the task file, for messages


@dataclass
class Task:
    name: str  # the file's stem: hellaswag_val.jsonl is "hellaswag_val"
    path: Path
    items: list[Item]


def read_tasks(paths: Iterable[str | Path], limit: int | None = None) -> list[Task]:
    """The task files at ``paths`` (the first ``limit`` items of each), each checked whole."""
    tasks = [read_task(Path(p), limit) for p in paths]
    seen: dict[str, Path] = {}
    for task in tasks:
        if task.name in seen:
            raise DataError(f"two task files are named {task.name!r} ({seen[task.name]} and {task.path}); "
                            "results are reported by file name, so rename one")
        seen[task.name] = task.path
    return tasks


def read_task(path: Path, limit: int | None = None) -> Task:
    """One task file; any bad line is a ``DataError`` naming the file and the line."""
    if not path.is_file():
        raise DataError(f"{path}: no such task file" if not path.exists() else f"{path}: not a file")
    items: list[Item] = []
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if limit is not None and len(items) >= limit:
                    break
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{number}: not UTF-8 text ({exc.reason})") from None
                if line.strip():
                    items.append(_parse_item(line, f"{path}:{number}", number))
    except OSError as exc:
        raise DataError(f"cannot read task file {path}: {exc.strerror or exc}") from None
    if not items:
        raise DataError(f"{path}: no items (a task file holds one JSON object per line)")
    return Task(path.name.removesuffix(".jsonl").removesuffix(".json"), path, items)


def _parse_item(line: str, where: str, number: int) -> Item:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: not JSON lmtrain reads (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "endings" in obj:  # HellaSwag's own format
        context_key, choices_key = "ctx", "endings"
    elif "choices" in obj:
        context_key, choices_key = ("context" if "context" in obj else "query"), "choices"
    else:
        raise DataError(f"{where}: no choices; expected HellaSwag's ctx/endings/label or "
                        "context/choices/label")
    context, choices = obj.get(context_key), obj[choices_key]
    if not isinstance(context, str):
        raise DataError(f"{where}: {context_key} must be a string, got {_shown(context)}")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: {choices_key} must be a list of strings")
    if len(choices) < 2:
        raise DataError(f"{where}: {len(choices)} choice{'s' if len(choices) != 1 else ''}; an item needs at least two")
    for i, choice in enumerate(choices):
        if not choice:
            raise DataError(f"{where}: choice {i} is empty")
    for what, text in [(context_key, context)] + [(f"choice {i}", c) for i, c in enumerate(choices)]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: JSON's \ud800 escapes allow one, no text has it
            raise DataError(f"{where}: {what} is not valid text (it holds a lone surrogate)") from None
    label = obj.get("label")
    if isinstance(label, str) and label.strip().isdecimal() and label.strip().isascii():
        label = int(label)  # the copy of HellaSwag on the Hugging Face hub writes "3"
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataError(f"{where}: label must be the index of the right choice, got {_shown(label)}")
    if not 0 <= label < len(choices):
        raise DataError(f"{where}: label {label} is out of range for {len(choices)} choices")
    return Item(context, tuple(choices), label, number)


def _shown(value) -> str:
    return "nothing" if value is None else repr(value) if len(repr(value)) < 40 else type(value).__name__


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------


def split_continuation(context: str, choice: str) -> tuple[str, str]:
    """(context, continuation) as they are tokenized: the choice after the delimiter, with the
    context's trailing whitespace moved over to it."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + DELIMITER + choice


@dataclass
class Row:
    """One sequence the model runs: a prefix, then continuations that each see the prefix and
    themselves. ``choices[i]`` is the choice of the item that the i-th continuation scores."""

    prefix: list[int]
    continuations: list[list[int]] = field(default_factory=list)
    choices: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        # A continuation's last token is only predicted, never read: it is not an input.
        return len(self.prefix) + sum(len(c) - 1 for c in self.continuations)


@dataclass
class EncodedItem:
    label: int
    tokens: list[int]  # per choice: continuation tokens
    utf8_bytes: list[int]  # per choice: bytes of the choice itself (the harness' acc_bytes)
    rows: list[Row]
    truncated: bool  # a context was cut from the left for some choice


@dataclass
class EncodedTask:
    name: str
    path: Path
    items: list[EncodedItem]


def encode_task(task: Task, tokenizer: "Tokenizer", eot_id: int, block_size: int) -> EncodedTask:
    """Tokenize every (context, choice) of ``task`` and lay out the rows the model will run."""
    contexts, wholes = [], []
    for item in task.items:
        for choice in item.choices:
            context, continuation = split_continuation(item.context, choice)
            contexts.append(context)
            wholes.append(context + continuation)
    context_ids = [e.ids for e in tokenizer.encode_batch(contexts, add_special_tokens=False)]
    whole_ids = [e.ids for e in tokenizer.encode_batch(wholes, add_special_tokens=False)]
    encoded, at = [], 0
    for item in task.items:
        pairs = []
        for choice in item.choices:
            prefix, whole = context_ids[at], whole_ids[at]
            at += 1
            if prefix:
                pairs.append((prefix, whole[len(prefix):]))
            elif whole and whole[0] == eot_id:  # as the harness: the continuation's own end-of-text leads
                pairs.append((whole[:1], whole[1:]))
            else:
                pairs.append(([eot_id], whole))
        encoded.append(_lay_out(item, pairs, block_size, f"{task.path}:{item.line}"))
    return EncodedTask(task.name, task.path, encoded)


def _lay_out(item: Item, pairs: list[tuple[list[int], list[int]]], block_size: int,
             where: str) -> EncodedItem:
    """Rows of at most ``block_size`` inputs: the context once, then as many choices as fit after
    it whole (another row with the context again when the next does not fit); a choice that does
    not fit even alone gets a row of its own, its context cut from the left (the harness cuts per
    choice too). An item with thousands of choices makes many rows, never one that outgrows the
    model: memory is bounded by the config, not by the task file."""
    shared = Row(pairs[0][0])
    rows, truncated = [shared], False
    for choice, (prefix, continuation) in enumerate(pairs):
        if not continuation:
            raise DataError(f"{where}: choice {choice} has no tokens of its own after the context")
        if len(continuation) > block_size:
            raise DataError(f"{where}: choice {choice} is {len(continuation)} tokens, more than the model's "
                            f"block_size ({block_size}); it cannot be scored")
        fits = len(prefix) + len(continuation) - 1 <= block_size
        if fits and prefix == shared.prefix and shared.length + len(continuation) - 1 > block_size:
            shared = Row(prefix)  # the shared row is full: the context again, for the choices after
            rows.append(shared)
        if fits and prefix == shared.prefix:
            row = shared
        else:
            if not fits:
                prefix, truncated = prefix[len(prefix) + len(continuation) - 1 - block_size:], True
            row = Row(prefix)
            rows.append(row)
        row.continuations.append(continuation)
        row.choices.append(choice)
    return EncodedItem(item.label, [len(c) for _, c in pairs], [len(c.encode("utf-8")) for c in item.choices],
                       [r for r in rows if r.continuations], truncated)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


class PackedChoices(FixedLayout):
    """The attention layout of a batch of rows, in the cache protocol ``GPT.hidden_states``
    follows (``lmtrain.kvcache``): positions per sequence, and a mask that lets the prefix see
    itself causally and each continuation see the prefix and itself. Padding (segment -1) sees
    the first position, so that no query has nothing to attend to."""

    def __init__(self, positions: torch.Tensor, segments: torch.Tensor) -> None:
        seg_q, seg_k = segments[:, :, None], segments[:, None, :]
        visible = (seg_k == 0) | (seg_k == seg_q)
        causal = positions[:, None, :] <= positions[:, :, None]
        super().__init__(positions, (visible & causal)[:, None])  # (B, 1, T, T): the same for every head


@dataclass
class ItemScore:
    loglikelihoods: list[float]  # per choice, nats
    tokens: list[int]
    utf8_bytes: list[int]
    label: int
    truncated: bool

    def predictions(self) -> dict[str, int]:
        ll = np.asarray(self.loglikelihoods)
        return {"acc": int(ll.argmax()), "acc_norm": int((ll / np.asarray(self.utf8_bytes)).argmax()),
                "acc_norm_tokens": int((ll / np.asarray(self.tokens)).argmax())}


@torch.no_grad()
def score_items(model: "GPT", items: list[EncodedItem], device: torch.device, amp_dtype: torch.dtype | None,
                batch_size: int = 16, progress: str | None = None, min_batches: int = 0,
                spare: EncodedItem | None = None) -> list[ItemScore]:
    """The log-likelihood of every choice of every item; ``batch_size`` rows per forward pass.

    ``min_batches``: run at least this many forward passes, repeating the first batch (or the
    rows of ``spare`` when there are no items) and discarding the result: a sharded model's
    forward pass is a collective that every rank must join."""
    lls = [np.zeros(len(item.tokens)) for item in items]
    rows = [(row, ll) for item, ll in zip(items, lls) for row in item.rows]
    rows.sort(key=lambda pair: -pair[0].length)  # similar lengths together: little padding
    batches = [rows[start:start + batch_size] for start in range(0, len(rows), batch_size)]
    if len(batches) < min_batches:
        first = batches[0] if batches else [(row, np.zeros(len(spare.tokens))) for row in spare.rows]
        filler = [(row, np.zeros_like(ll)) for row, ll in first]
        batches += [filler] * (min_batches - len(batches))
    was_training = model.training
    model.eval()
    from tqdm.auto import tqdm

    try:
        for batch in tqdm(batches, desc=progress or "", unit="batch", leave=False, disable=progress is None):
            _score_batch(model, batch, device, amp_dtype)
    finally:
        model.train(was_training)
    return [ItemScore(ll.tolist(), item.tokens, item.utf8_bytes, item.label, item.truncated)
            for ll, item in zip(lls, items)]


def _score_batch(model: "GPT", rows: list[tuple[Row, np.ndarray]], device: torch.device,
                 amp_dtype: torch.dtype | None) -> None:
    """Add the log-probabilities of each row's continuations to its item's (the array beside it)."""
    width = max(row.length for row, _ in rows)
    tokens = np.zeros((len(rows), width), dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    segments = np.full((len(rows), width), -1, dtype=np.int64)
    query_row, query_pos, targets, owners = [], [], [], []
    for b, (row, lls) in enumerate(rows):
        p = len(row.prefix)
        tokens[b, :p], positions[b, :p], segments[b, :p] = row.prefix, np.arange(p), 0
        at = p
        for segment, (continuation, choice) in enumerate(zip(row.continuations, row.choices), 1):
            n = len(continuation) - 1
            tokens[b, at:at + n] = continuation[:-1]
            positions[b, at:at + n] = np.arange(p, p + n)
            segments[b, at:at + n] = segment
            # The first token is predicted at the prefix's last position, the rest at their own.
            query_row += [b] * (n + 1)
            query_pos += [p - 1, *range(at, at + n)]
            targets += continuation
            owners += [(lls, choice)] * (n + 1)
            at += n
    layout = PackedChoices(torch.from_numpy(positions).to(device), torch.from_numpy(segments).to(device))
    with autocast(device, amp_dtype):
        hidden = model.hidden_states(torch.from_numpy(tokens).to(device), cache=layout)
        picked = hidden[torch.tensor(query_row, device=device), torch.tensor(query_pos, device=device)]
        logits = model.logits(picked)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    target_lp = log_probs.gather(1, torch.tensor(targets, device=device)[:, None])[:, 0].double().cpu().numpy()
    for (lls, choice), value in zip(owners, target_lp):
        lls[choice] += value


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------


@dataclass
class TaskScore:
    name: str
    path: str
    items: int
    acc: float
    acc_stderr: float | None
    acc_norm: float
    acc_norm_stderr: float | None
    acc_norm_tokens: float
    acc_norm_tokens_stderr: float | None
    chance: float  # expected acc of guessing: the mean of 1 / choices
    truncated: int  # items whose context was cut from the left to fit block_size
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def score_task(model: "GPT", task: EncodedTask, device: torch.device, amp_dtype: torch.dtype | None,
               batch_size: int = 16, info: dist_util.DistInfo | None = None,
               progress: str | None = None) -> TaskScore:
    """Accuracy of ``model`` on ``task``; under torchrun each rank scores its share of the items."""
    info = info or dist_util.DistInfo()
    start = time.perf_counter()
    mine = task.items[info.rank :: info.world_size]
    min_batches = 0
    if is_sharded(model):  # every rank must make as many forward passes as the busiest one
        rows = torch.tensor([math.ceil(sum(len(item.rows) for item in mine) / batch_size)], device=device)
        torch.distributed.all_reduce(rows, op=torch.distributed.ReduceOp.MAX)
        min_batches = int(rows.item())
    scores = score_items(model, mine, device, amp_dtype, batch_size, progress, min_batches, task.items[0])
    # Sums over items: count, then the correct ones per metric, the chance level and truncations.
    sums = np.zeros(2 + len(METRICS) + 1)
    for score in scores:
        picked = score.predictions()
        sums += [1, 1 / len(score.tokens), *(picked[m] == score.label for m in METRICS), score.truncated]
    if info.enabled:
        total = torch.tensor(sums, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total)
        sums = total.cpu().numpy()
    n = int(sums[0])
    rates = {m: sums[2 + i] / n for i, m in enumerate(METRICS)}
    return TaskScore(task.name, str(task.path), n,
                     rates["acc"], standard_error(rates["acc"], n),
                     rates["acc_norm"], standard_error(rates["acc_norm"], n),
                     rates["acc_norm_tokens"], standard_error(rates["acc_norm_tokens"], n),
                     chance=sums[1] / n, truncated=int(sums[-1]), seconds=time.perf_counter() - start)


def standard_error(rate: float, n: int) -> float | None:
    """Of a share of n right/wrong answers: the sample standard deviation over sqrt(n), as the
    harness reports it (``mean_stderr``)."""
    return math.sqrt(rate * (1 - rate) / (n - 1)) if n > 1 else None


# --------------------------------------------------------------------------------------------
# `lmtrain eval --tasks`
# --------------------------------------------------------------------------------------------


@dataclass
class TasksResult:
    checkpoint: str
    step: int
    tasks: list[TaskScore]

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "step": self.step,
                "tasks": {t.name: {k: v for k, v in t.to_dict().items() if k != "name"} for t in self.tasks}}


def evaluate_tasks(run_dir: Path, files: list[str], checkpoint: str = "best", device: str = "auto",
                   batch_size: int = 16, limit: int | None = None) -> TasksResult:
    """Score a checkpoint of ``run_dir`` on the multiple-choice task ``files``."""
    from lmtrain.inference import load_model

    tasks = read_tasks(files, limit)  # a bad task file is refused before the model loads
    loaded = load_model(run_dir, checkpoint, device)
    block = loaded.model.config.block_size
    scores = [score_task(loaded.model, encode_task(task, loaded.tokenizer, loaded.eot_id, block), loaded.device,
                         loaded.amp_dtype, batch_size, progress=f"eval: {task.name}") for task in tasks]
    return TasksResult(loaded.checkpoint.name, loaded.step, scores)


def format_table(result: TasksResult) -> str:
    """The per-task table `lmtrain eval --tasks` prints."""
    def cell(rate: float, stderr: float | None) -> str:
        return f"{rate:.4f} ± {stderr:.4f}" if stderr is not None else f"{rate:.4f}"

    header = ("task", "items", "acc", "acc_norm", "acc_norm_tokens", "chance", "truncated")
    rows = [(t.name, str(t.items), cell(t.acc, t.acc_stderr), cell(t.acc_norm, t.acc_norm_stderr),
             cell(t.acc_norm_tokens, t.acc_norm_tokens_stderr), f"{t.chance:.4f}", str(t.truncated))
            for t in result.tasks]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"checkpoint {result.checkpoint} (step {result.step})"]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in [header, *rows]]
    return "\n".join(lines)
