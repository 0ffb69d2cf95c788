"""The run's byte-level tokenizer: train it, save it, load it.

Both models work on bytes: the text is first mapped byte by byte onto 256 printable characters
(GPT-2's ByteLevel pre-tokenizer, which also splits it into words and spaces), and every one of
those 256 is in the vocabulary, so any string, in any script or with any control character,
encodes without an unknown token and decodes back to itself exactly: decode(encode(x)) == x for
every string x (tested on emoji, CJK, combining marks, NUL and tabs, for both models).

    tokenizer.model: bpe       byte-level BPE, GPT-2's scheme: pieces built by merging frequent pairs
    tokenizer.model: unigram   byte-level Unigram (SentencePiece's model, trained by ``tokenizers``):
                               a large candidate vocabulary pruned to the pieces that best explain
                               the text under a unigram language model; encoding picks the most
                               likely segmentation (Viterbi)

There is deliberately no normalizer: NFC/NFKC would change the text, and then decode(encode(x))
would no longer be x.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from lmtrain.config import Config
from lmtrain.corpus import check_sources, iter_split
from lmtrain.errors import DataError, RunDirError, TokenizerError
from lmtrain.fsutil import atomic_dir, describe_os_error, remove_stale_tmp, sha256_file, write_json
from lmtrain.rundir import (checkpoints_dir, data_dir, hold_run_dir, move_aside, prepare_run_dir, tb_dir,
                            tokenizer_dir, tokenizer_path)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

# bytes/token is measured on at most this much validation text: enough for three significant
# digits, small enough that measuring never takes longer than training.
MEASURE_BYTES_LIMIT = 16 << 20
ENCODE_BATCH_DOCS = 256


@dataclass
class TokenizerStats:
    vocab_size: int
    special_tokens: list[str]
    documents: int
    utf8_bytes: int
    train_seconds: float
    bytes_per_token: float | None
    measured_on: str  # "val" normally; "train" when the val split is empty
    sha256: str
    path: str
    settings: dict = None  # the tokenizer and data config it was trained with (tokenizer_settings)
    moved_aside: list = None  # where the old tokenizer, shards and checkpoints went; not saved
    copied_from: str | None = None  # model.init_from: the source's tokenizer.json, copied as is


def tokenizer_settings(config: Config) -> dict:
    """What a trained tokenizer depends on: if these change, it is stale."""
    return {"tokenizer": asdict(config.tokenizer), "data": asdict(config.data)}


def stale_tokenizer_reason(config: Config) -> str | None:
    """Why the run's tokenizer does not match ``config`` (None if it does, or cannot tell)."""
    stats_path = tokenizer_dir(config.run_dir) / "stats.json"
    try:
        saved = json.loads(stats_path.read_text("utf-8")).get("settings")
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    current = tokenizer_settings(config)
    for section in ("tokenizer", "data"):
        for key, value in current[section].items():
            if key in saved.get(section, {}) and saved[section][key] != value:
                return (f"the run's tokenizer was trained with {section}.{key}={saved[section][key]!r}, "
                        f"the config now says {value!r}")
    return None


def build_tokenizer(model: str = "bpe") -> "Tokenizer":
    """An untrained byte-level tokenizer (model, pre-tokenizer, decoder): ``bpe`` or ``unigram``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE() if model == "bpe" else models.Unigram())
    # add_prefix_space=False: a leading space would be added on encode and kept on decode,
    # breaking the exact round trip.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(config: Config, force: bool = False) -> TokenizerStats:
    """Train the BPE on the training split of ``data.source``; write it into the run directory."""
    from lmtrain.pretrained import resolve

    config = resolve(config)
    with hold_run_dir(config.run_dir, "tokenize"):
        return _train_tokenizer(config, force)


def _train_tokenizer(config: Config, force: bool) -> TokenizerStats:
    from tokenizers import pre_tokenizers, trainers
    from tqdm.auto import tqdm

    run_dir = config.run_dir
    out_path = tokenizer_path(run_dir)
    if out_path.exists() and not force:
        raise RunDirError(
            f"{out_path} already exists; the run's shards and checkpoints depend on it. "
            "Use --force to train a new one (then re-run shard and train with --restart)"
        )
    if config.model.init_from is not None:
        return _copy_from_source(config)
    check_sources(config.data)
    tok_cfg = config.tokenizer
    tokenizer = build_tokenizer(tok_cfg.model)
    if tok_cfg.model == "bpe":
        trainer = trainers.BpeTrainer(
            vocab_size=tok_cfg.vocab_size,
            min_frequency=tok_cfg.min_frequency,
            special_tokens=list(tok_cfg.special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,  # our own tqdm bar counts documents instead
        )
    else:
        # All 256 byte characters stay in the vocabulary whatever the pruning does, so no unknown
        # token is needed (unk_token None): every input has a segmentation into known pieces.
        trainer = trainers.UnigramTrainer(
            vocab_size=tok_cfg.vocab_size,
            special_tokens=list(tok_cfg.special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            unk_token=None,
            show_progress=False,
        )
    counter = _DocumentCounter(iter_split(config.data, "train"))
    start = time.perf_counter()
    with tqdm(desc="tokenize: reading documents", unit="doc", leave=False) as bar:
        tokenizer.train_from_iterator(_progress(counter, bar), trainer=trainer)
    train_seconds = time.perf_counter() - start
    if counter.documents == 0:
        raise DataError(f"data.source {config.data.source!r}: the training split has no non-empty documents")
    _check_specials_are_single_ids(tokenizer, tok_cfg.special_tokens)

    bpt, measured_on = measure_bytes_per_token(tokenizer, config)

    stats = TokenizerStats(
        vocab_size=tokenizer.get_vocab_size(),
        special_tokens=list(tok_cfg.special_tokens),
        documents=counter.documents,
        utf8_bytes=counter.utf8_bytes,
        train_seconds=round(train_seconds, 3),
        bytes_per_token=bpt,
        measured_on=measured_on,
        sha256="",
        path=str(out_path),
        settings=tokenizer_settings(config),
        moved_aside=[],
    )
    _install(config, lambda target: tokenizer.save(str(target)), stats)
    log.debug("tokenizer: vocab %d, %.3f bytes/token, wrote %s", stats.vocab_size, bpt or 0.0, out_path)
    return stats


def _install(config: Config, write_tokenizer, stats: TokenizerStats) -> None:
    """Put a new ``tokenizer/`` (``write_tokenizer(path)`` writes tokenizer.json) and its stats in
    place. Only now does anything touch the run directory. The directory is filled beside the old
    one and swapped in whole, so a full disk leaves the old tokenizer (and what was made with it)
    exactly where it was; a new tokenizer makes the run's shards and checkpoints meaningless, so
    they go aside with the old tokenizer, never deleted."""
    run_dir = prepare_run_dir(config)
    out_dir = tokenizer_dir(run_dir)
    remove_stale_tmp(run_dir)
    try:
        with atomic_dir(out_dir) as staging:
            write_tokenizer(staging / "tokenizer.json")
            stats.sha256 = sha256_file(staging / "tokenizer.json")
            write_json(staging / "stats.json", {k: v for k, v in asdict(stats).items() if k != "moved_aside"})
            for old in (out_dir, data_dir(run_dir), checkpoints_dir(run_dir), tb_dir(run_dir)):
                target = move_aside(old)
                if target is not None:
                    log.info("tokenize: moved %s aside to %s (made with the old tokenizer)", old, target)
                    stats.moved_aside.append(str(target))
    except Exception as exc:  # tokenizers reports failed writes as a bare Exception
        reason = describe_os_error(exc) if isinstance(exc, OSError) else str(exc).splitlines()[0]
        raise TokenizerError(f"could not write {out_dir}: {reason}; the previous tokenizer (if any) is "
                             "untouched") from None


def _copy_from_source(config: Config) -> TokenizerStats:
    """``model.init_from``: the source's tokenizer becomes the run's; nothing is trained."""
    import shutil

    from lmtrain.pretrained import open_source

    source = open_source(config.model.init_from)
    tokenizer = load_tokenizer_file(source.tokenizer_file)
    _check_specials_are_single_ids(tokenizer, config.tokenizer.special_tokens)
    stats = TokenizerStats(vocab_size=tokenizer.get_vocab_size(), special_tokens=list(config.tokenizer.special_tokens),
                           documents=0, utf8_bytes=0, train_seconds=0.0, bytes_per_token=None, measured_on="none",
                           sha256="", path=str(tokenizer_path(config.run_dir)), settings=tokenizer_settings(config),
                           moved_aside=[], copied_from=str(source.tokenizer_file))
    _install(config, lambda target: shutil.copyfile(source.tokenizer_file, target), stats)
    return stats


def measure_bytes_per_token(tokenizer: "Tokenizer", config: Config) -> tuple[float | None, str]:
    """UTF-8 bytes per token on the val split (or the train split if val is empty)."""
    for split in ("val", "train"):
        texts = _take_bytes(iter_split(config.data, split), MEASURE_BYTES_LIMIT)
        if texts:
            return round(bytes_per_token(tokenizer, texts), 4), split
    return None, "none"


def bytes_per_token(tokenizer: "Tokenizer", texts: list[str]) -> float:
    total_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    total_tokens = 0
    for i in range(0, len(texts), ENCODE_BATCH_DOCS):
        batch = tokenizer.encode_batch(texts[i : i + ENCODE_BATCH_DOCS], add_special_tokens=False)
        total_tokens += sum(len(enc.ids) for enc in batch)
    return total_bytes / max(total_tokens, 1)


def load_tokenizer(run_dir: Path) -> "Tokenizer":
    """The run's trained tokenizer; a clear error if it is missing or unreadable."""
    path = tokenizer_path(run_dir)
    if not path.exists():
        raise TokenizerError(f"no tokenizer at {path}; run `lmtrain tokenize` first")
    return load_tokenizer_file(path)


def load_tokenizer_file(path: Path) -> "Tokenizer":
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenizerError(
            f"{path} is not a valid tokenizer ({first}); re-run `lmtrain tokenize --force`"
        ) from None


def eot_id(tokenizer: "Tokenizer", special_tokens: list[str]) -> int:
    """Id of the end-of-text token (the first special token)."""
    token_id = tokenizer.token_to_id(special_tokens[0])
    if token_id is None:
        raise TokenizerError(
            f"the tokenizer has no special token {special_tokens[0]!r} "
            "(tokenizer.special_tokens changed since it was trained?); re-run `lmtrain tokenize --force`"
        )
    return token_id


def _check_specials_are_single_ids(tokenizer: "Tokenizer", specials: list[str]) -> None:
    for tok in specials:
        ids = tokenizer.encode(tok, add_special_tokens=False).ids
        if len(ids) != 1:  # would be a bug in how we built the tokenizer
            raise AssertionError(f"special token {tok!r} encodes to {len(ids)} ids")


class _DocumentCounter:
    """Passes document texts through while counting documents and UTF-8 bytes."""

    def __init__(self, docs: Iterable) -> None:
        self._docs = docs
        self.documents = 0
        self.utf8_bytes = 0

    def __iter__(self) -> Iterator[str]:
        for doc in self._docs:
            self.documents += 1
            self.utf8_bytes += len(doc.text.encode("utf-8", "surrogatepass"))
            yield doc.text


def _progress(texts: Iterable[str], bar) -> Iterator[str]:
    for text in texts:
        bar.update(1)
        yield text


def _take_bytes(docs: Iterable, limit: int) -> list[str]:
    texts, size = [], 0
    for doc in docs:
        texts.append(doc.text)
        size += len(doc.text)
        if size >= limit:
            break
    return texts
