"""The tokenize and shard stages: a run's tokenizer and shards, made from the config.

``train_tokenizer`` trains the run's tokenizer on the corpus (or copies ``model.init_from``'s),
``build_shards`` encodes the corpus into shards with it. Each stage takes the run directory's
writer lock, checks that what is already there agrees with the config (tokenizer.py and shards.py
own those checks, beside their formats), and swaps its artifact in whole: a crash or a full disk
leaves the previous one in place. The formats themselves (the tokenizer file, the shard header,
writer, manifest, reader and verifier) live in tokenizer.py and shards.py; this module is where a
new kind of data preparation goes.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from lmtrain.chat_template import (CHATML, CHATML_TOKENS, TEMPLATE_FILE, ChatTemplate, load_template, read_template,
                                   special_tokens_of)
from lmtrain.config import Config
from lmtrain.corpus import Document, Split, check_sources, iter_both_splits, iter_split
from lmtrain.errors import DataError, RunDirError, ShardError, TokenizerError, first_line
from lmtrain.fsutil import (atomic_dir, atomic_write_json, describe_os_error, fsync_dir, remove_stale_tmp,
                            seal_staging, sha256_file, staging_dir, write_json)
from lmtrain.pretrained import open_source, resolve
from lmtrain.rundir import (checkpoints_dir, data_dir, hold_run_dir, move_aside, prepare_run_dir, tb_dir,
                            tokenizer_dir, tokenizer_path)
from lmtrain.shards import (MANIFEST_NAME, SPLITS, Manifest, ShardWriter, SplitTotals, make_manifest,
                            old_name, read_manifest, recover_interrupted_swap, shard_file_bytes, shard_fingerprint)
from lmtrain.small_data import SMALL_TEXT_BYTES, corpus_vocab
from lmtrain.tokenizer import (SOURCE_TOKENIZER_FILES, VOCAB_KEY, build_tokenizer, bytes_per_token, run_tokenizer_config,
                               check_specials_are_single_ids, check_tokenizer_agrees, eot_id, load_tokenizer,
                               load_tokenizer_file, run_bos_ids, tokenizer_settings)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

# bytes/token is measured on at most this much validation text: enough for three significant
# digits, small enough that measuring never takes longer than training.
MEASURE_BYTES_LIMIT = 16 << 20
# Text handed to the encoder per batch: big enough to keep every encoder thread busy, small
# enough that memory stays flat whatever the corpus size.
BATCH_TEXT_BYTES = 4 << 20
ENCODE_AHEAD = 1


# --------------------------------------------------------------------------------------------
# lmtrain tokenize
# --------------------------------------------------------------------------------------------


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


def train_tokenizer(config: Config, force: bool = False) -> TokenizerStats:
    """Train the BPE on the training split of ``data.source``; write it into the run directory."""
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
    config, chosen = _vocab_for_corpus(config)
    tok_cfg = config.tokenizer
    specials = trained_special_tokens(config)
    tokenizer = build_tokenizer(tok_cfg.model)
    if tok_cfg.model == "bpe":
        trainer = trainers.BpeTrainer(
            vocab_size=tok_cfg.vocab_size,
            min_frequency=tok_cfg.min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,  # our own tqdm bar counts documents instead
        )
    else:
        # All 256 byte characters stay in the vocabulary whatever the pruning does, so no unknown
        # token is needed (unk_token None): every input has a segmentation into known pieces.
        trainer = trainers.UnigramTrainer(
            vocab_size=tok_cfg.vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            unk_token=None,
            show_progress=False,
        )
    counter = _DocumentCounter(_texts_of(config, "train"))
    start = time.perf_counter()
    with tqdm(desc="tokenize: reading documents", unit="doc", leave=False) as bar:
        tokenizer.train_from_iterator(_progress(counter, bar), trainer=trainer)
    train_seconds = time.perf_counter() - start
    if counter.documents == 0:
        raise DataError(f"data.source {config.data.source!r}: the training split has no non-empty documents")
    check_specials_are_single_ids(tokenizer, specials)

    bpt, measured_on = measure_bytes_per_token(tokenizer, config)

    stats = TokenizerStats(
        vocab_size=tokenizer.get_vocab_size(),
        special_tokens=specials,
        documents=counter.documents,
        utf8_bytes=counter.utf8_bytes,
        train_seconds=round(train_seconds, 3),
        bytes_per_token=bpt,
        measured_on=measured_on,
        sha256="",
        path=str(out_path),
        settings={**tokenizer_settings(config), "chosen": [VOCAB_KEY] if chosen else []},
        moved_aside=[],
    )
    def write(directory: Path) -> None:
        tokenizer.save(str(directory / "tokenizer.json"))
        if config.data.format == "chat":  # the template the shards are rendered with, kept beside it
            (directory / TEMPLATE_FILE).write_text(config.tokenizer.chat_template or CHATML, encoding="utf-8")

    _install(config, write, stats)
    log.debug("tokenizer: vocab %d, %.3f bytes/token, wrote %s", stats.vocab_size, bpt or 0.0, out_path)
    return stats


def _vocab_for_corpus(config: Config) -> tuple[Config, str | None]:
    """The config with the vocabulary ``small_data.corpus_vocab`` picks for the training split's
    size, counted in one pass that stops where the size no longer matters."""
    counter = _DocumentCounter(_texts_of(config, "train"))
    for _ in counter:
        if counter.utf8_bytes >= SMALL_TEXT_BYTES:
            break
    vocab, note = corpus_vocab(config, counter.utf8_bytes)
    if note is None:
        return config, None
    log.info("tokenize: %s", note)
    return replace(config, tokenizer=replace(config.tokenizer, vocab_size=vocab)), note


def _install(config: Config, write_tokenizer, stats: TokenizerStats) -> None:
    """Put a new ``tokenizer/`` (``write_tokenizer(directory)`` writes tokenizer.json) and its stats in
    place. Only now does anything touch the run directory. The directory is filled beside the old
    one and swapped in whole, so a full disk leaves the old tokenizer (and what was made with it)
    exactly where it was; a new tokenizer makes the run's shards and checkpoints meaningless, so
    they go aside with the old tokenizer, never deleted."""
    run_dir = prepare_run_dir(config)
    out_dir = tokenizer_dir(run_dir)
    remove_stale_tmp(run_dir)
    try:
        with atomic_dir(out_dir) as staging:
            write_tokenizer(staging)
            stats.sha256 = sha256_file(staging / "tokenizer.json")
            write_json(staging / "stats.json", {k: v for k, v in asdict(stats).items() if k != "moved_aside"})
            for old in (out_dir, data_dir(run_dir), checkpoints_dir(run_dir), tb_dir(run_dir)):
                target = move_aside(old)
                if target is not None:
                    log.info("tokenize: moved %s aside to %s (made with the old tokenizer)", old, target)
                    stats.moved_aside.append(str(target))
    except Exception as exc:  # tokenizers reports failed writes as a bare Exception
        reason = describe_os_error(exc) if isinstance(exc, OSError) else first_line(exc)
        raise TokenizerError(f"could not write {out_dir}: {reason}; the previous tokenizer (if any) is "
                             "untouched") from None


def _copy_from_source(config: Config) -> TokenizerStats:
    """``model.init_from``: the source's tokenizer becomes the run's; nothing is trained."""
    source = open_source(config.model.init_from)
    tokenizer = load_tokenizer_file(source.tokenizer_file)
    check_specials_are_single_ids(tokenizer, config.tokenizer.special_tokens)
    own_template = config.tokenizer.chat_template
    if config.data.format == "chat" and own_template is None and read_template(source.tokenizer_file.parent) is None:
        raise TokenizerError(f"model.init_from {config.model.init_from}: the model ships no chat template, and "
                             "data.format chat needs one: set tokenizer.chat_template (a Jinja template written "
                             "with the model's own special tokens)")
    stats = TokenizerStats(vocab_size=tokenizer.get_vocab_size(), special_tokens=list(config.tokenizer.special_tokens),
                           documents=0, utf8_bytes=0, train_seconds=0.0, bytes_per_token=None, measured_on="none",
                           sha256="", path=str(tokenizer_path(config.run_dir)), settings=tokenizer_settings(config),
                           moved_aside=[], copied_from=str(source.tokenizer_file))
    def copy(directory: Path) -> None:
        for name in ("tokenizer.json", *SOURCE_TOKENIZER_FILES):
            if (source.tokenizer_file.parent / name).is_file():
                shutil.copyfile(source.tokenizer_file.parent / name, directory / name)
        if own_template is not None:  # the config's template replaces the source's in this run
            (directory / TEMPLATE_FILE).write_text(own_template, encoding="utf-8")

    _install(config, copy, stats)
    return stats


def trained_special_tokens(config: Config) -> list[str]:
    """``tokenizer.special_tokens``, and for chat data under lmtrain's ChatML template its
    ``<|im_start|>`` and ``<|im_end|>``: each must be one token."""
    specials = list(config.tokenizer.special_tokens)
    if config.data.format == "chat" and config.tokenizer.chat_template is None:
        specials += [t for t in CHATML_TOKENS if t not in specials]
    return specials


def _texts_of(config: Config, split: Split) -> Iterator[Document]:
    """The split's documents as the tokenizer sees them: conversations rendered with the run's
    template (so its merges are learned on the text the shards will hold), records left out by
    data.bad_records skip dropped."""
    docs = iter_split(config.data, split)
    if config.data.format != "chat":
        yield from docs
        return
    template = ChatTemplate(config.tokenizer.chat_template or CHATML)
    for doc in docs:
        if doc.bad is None:  # a mixture's text source passes as it is
            yield doc if doc.messages is None else Document(template.render(doc.messages), doc.origin)


def measure_bytes_per_token(tokenizer: "Tokenizer", config: Config) -> tuple[float | None, str]:
    """UTF-8 bytes per token on the val split (or the train split if val is empty)."""
    for split in ("val", "train"):
        texts = _take_bytes(_texts_of(config, split), MEASURE_BYTES_LIMIT)
        if texts:
            return round(bytes_per_token(tokenizer, texts), 4), split
    return None, "none"


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


# --------------------------------------------------------------------------------------------
# lmtrain shard
# --------------------------------------------------------------------------------------------


@dataclass
class ShardResult:
    up_to_date: bool
    data_dir: str
    manifest: "Manifest"
    seconds: float = 0.0
    tokens_per_sec: float = 0.0

    @property
    def splits(self) -> dict[str, "SplitTotals"]:
        return self.manifest.splits

    @property
    def bytes_per_token(self) -> float:
        totals = self.manifest.splits.values()
        tokens = sum(s.tokens - s.documents for s in totals)  # eot ids excluded
        return sum(s.utf8_bytes for s in totals) / max(tokens, 1)


def build_shards(config: Config, force: bool = False) -> ShardResult:
    """Encode the corpus into train/val shards under ``RUN_DIR/data`` (or say they are current)."""
    config = run_tokenizer_config(resolve(config))
    with hold_run_dir(config.run_dir, "shard"):
        return _build_shards(config, force)


def _build_shards(config: Config, force: bool) -> ShardResult:
    from tqdm.auto import tqdm

    run_dir = config.run_dir
    check_tokenizer_agrees(config)  # shards from a tokenizer trained for other data are wrong
    tokenizer = load_tokenizer(run_dir)
    tok_sha = sha256_file(tokenizer_path(run_dir))
    eot = eot_id(tokenizer, config.tokenizer.special_tokens)
    chat = config.data.format == "chat"
    # A source's BOS starts every document, as in its pretraining; a chat template writes its own.
    bos = [] if chat else run_bos_ids(run_dir, tokenizer)
    vocab_size = tokenizer.get_vocab_size()
    out = data_dir(run_dir)
    template = load_template(tokenizer_dir(run_dir), config.tokenizer.special_tokens[0]) if chat else None
    fingerprint = shard_fingerprint(config, tok_sha, bos, template.source if chat else None)

    recover_interrupted_swap(out)
    if not force and _is_up_to_date(out, fingerprint):
        return ShardResult(True, str(out), read_manifest(out))

    check_sources(config.data)
    if config.shard.num_proc is not None:
        # The encoder's thread pool (rayon) reads this when it first starts.
        os.environ.setdefault("RAYON_NUM_THREADS", str(config.shard.num_proc))
    prepare_run_dir(config)
    # New shards are built in a staging directory beside data/ and swapped in only when whole,
    # so the previous shards stay intact (and usable) until the new ones are complete.
    remove_stale_tmp(run_dir, out.name)
    staging = staging_dir(out)

    writers = {split: ShardWriter(staging, split, config.shard.shard_tokens, vocab_size, eot, tok_sha, masked=chat)
               for split in SPLITS}
    encode, write = _encode, _write_encoded
    if chat:
        encoder = _ConversationEncoder(tokenizer, template, config.train.loss_on, run_bos_ids(run_dir, tokenizer), eot)
        encode, write = encoder.encode, encoder.write
    start = time.perf_counter()
    total_tokens = total_docs = 0
    try:
        with tqdm(desc="shard", unit="tok", unit_scale=True, leave=False) as bar, \
                ThreadPoolExecutor(max_workers=ENCODE_AHEAD) as pool:
            # Encoding runs on worker threads (the encoder releases the GIL), a few batches
            # ahead, while this thread reads the next batch and writes finished ones: reading
            # and writing hide behind the encoder, and no encoder thread idles at the end of
            # a batch waiting for its slowest document.
            pending: deque = deque()
            for batch in _batches(iter_both_splits(config.data)):
                pending.append((batch, pool.submit(encode, tokenizer, batch)))
                if len(pending) > ENCODE_AHEAD:
                    total_tokens, total_docs = write(writers, *pending.popleft(), bos, eot,
                                                     bar, total_tokens, total_docs)
            while pending:
                total_tokens, total_docs = write(writers, *pending.popleft(), bos, eot,
                                                 bar, total_tokens, total_docs)
        records = [r for split in SPLITS for r in writers[split].close()]
        seconds = time.perf_counter() - start
        conversations = None
        if chat:
            conversations = {split: {"trained_tokens": writers[split].trained_tokens,
                                     "skipped_records": encoder.skipped[split]} for split in SPLITS}
        manifest = make_manifest(fingerprint, records, vocab_size, eot, tok_sha,
                                 {split: writers[split].byte_counts.tolist() for split in SPLITS}, conversations)
        for split in SPLITS:
            if manifest.splits[split].tokens == 0:
                raise ShardError(_empty_split_message(split, config))
        atomic_write_json(staging / MANIFEST_NAME, manifest.to_dict())  # last: the set is now whole
        seal_staging(staging)
        _swap_in(staging, out)
    except OSError as exc:
        raise ShardError(f"could not write shards in {staging}: {describe_os_error(exc)}; "
                         f"the previous shards in {out} (if any) are untouched") from None
    finally:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
    log.debug("shard: wrote %d shards to %s", len(records), out)
    return ShardResult(False, str(out), manifest, seconds, total_tokens / max(seconds, 1e-9))


def _encode(tokenizer, batch: list[tuple[Split, Document]]):
    return tokenizer.encode_batch_fast([doc.text for _, doc in batch], add_special_tokens=False)


def _write_encoded(writers, batch, future, bos: list[int], eot: int, bar, total_tokens, total_docs):
    import numpy as np

    batch_tokens = 0
    for (split, doc), enc in zip(batch, future.result()):
        ids = bos + enc.ids  # (enc.ids is a fresh list each access: take it once)
        ids.append(eot)
        writer = writers[split]
        raw = doc.text.encode("utf-8", "surrogatepass")
        writer.write_document(np.asarray(ids, dtype=writer.dtype), len(raw))
        writer.byte_counts += np.bincount(np.frombuffer(raw, dtype=np.uint8), minlength=256)
        batch_tokens += len(ids)
    bar.update(batch_tokens)
    bar.set_postfix(docs=total_docs + len(batch), refresh=False)
    return total_tokens + batch_tokens, total_docs + len(batch)


class _ConversationEncoder:
    """The shard stage's encode and write for ``data.format: chat``: each conversation rendered
    with the run's template, its ids and loss mask (``conversations.encode``); bits per byte count
    the bytes of what is trained (the assistant's contents, or everything with loss_on all)."""

    def __init__(self, tokenizer, template: ChatTemplate, loss_on: str, bos: list[int], eot: int) -> None:
        self.template, self.loss_on = template, loss_on
        self.bos, self.eot = bos, eot  # a text document of a mixture: as text shards hold it
        self.specials = special_tokens_of(tokenizer)
        self.skipped = {split: 0 for split in SPLITS}

    def encode(self, tokenizer, batch: list[tuple[Split, Document]]):
        from lmtrain.conversations import encode, trained_text

        import numpy as np

        out = []
        for _, doc in batch:
            if doc.bad is not None:
                out.append(None)
                continue
            if doc.messages is None:  # text: every token trained
                ids = np.asarray(self.bos + tokenizer.encode(doc.text, add_special_tokens=False).ids + [self.eot])
                out.append((ids, np.ones(len(ids), dtype=np.uint8), doc.text.encode("utf-8", "surrogatepass")))
                continue
            try:
                ids, mask = encode(tokenizer, self.template, doc.messages, self.specials, self.loss_on)
            except DataError as exc:
                raise DataError(f"{doc.origin}: {exc}") from None
            trained = trained_text(self.template, doc.messages, self.loss_on)
            out.append((ids, mask, trained.encode("utf-8", "surrogatepass")))
        return out

    def write(self, writers, batch, future, bos, eot, bar, total_tokens, total_docs):
        import numpy as np

        batch_tokens = written = 0
        for (split, doc), encoded in zip(batch, future.result()):
            if encoded is None:
                self.skipped[split] += 1
                log.info("shard: skipped %s: %s", doc.origin, doc.bad)
                continue
            ids, mask, trained = encoded
            writer = writers[split]
            batch_tokens += writer.write_conversation(ids, mask, len(trained), doc.part)
            writer.byte_counts += np.bincount(np.frombuffer(trained, dtype=np.uint8), minlength=256)
            written += 1
        bar.update(batch_tokens)
        return total_tokens + batch_tokens, total_docs + written


def _batches(docs: Iterable[tuple[Split, Document]]) -> Iterator[list[tuple[Split, Document]]]:
    batch, size = [], 0
    for item in docs:
        batch.append(item)
        size += len(item[1].text)
        if size >= BATCH_TEXT_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _empty_split_message(split: str, config: Config) -> str:
    if split == "val":
        return (
            f"the val split came out empty (data.val_fraction={config.data.val_fraction} of too few "
            "documents): raise data.val_fraction, split a single-file corpus into more documents "
            "with data.sample_by: paragraph (or line), give data.val_source, or add data"
        )
    return "the train split came out empty: lower data.val_fraction or add data"


def _swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` by the complete ``staging`` directory.

    Two renames: a crash between them leaves ``out`` missing and ``out.old`` whole, which
    ``recover_interrupted_swap`` puts back.
    """
    old = old_name(out)
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _is_up_to_date(out: Path, fingerprint: dict) -> bool:
    try:
        manifest = read_manifest(out)
    except ShardError:
        return False
    if manifest.fingerprint != fingerprint:
        return False
    for entry in manifest.shards:
        path = out / entry.file
        if not path.is_file() or path.stat().st_size != shard_file_bytes(entry.tokens, manifest.itemsize,
                                                                         manifest.masked):
            return False
    return True
