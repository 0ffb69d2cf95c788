"""Corpus sources: ``data.source`` -> a stream of documents, and the train/val split.

A source is one string:

* a local file, a directory (searched recursively) or a glob of ``.txt``, ``.jsonl``/``.json``,
  ``.parquet`` and ``.csv`` files, read with the ``datasets`` library's local loaders;
* ``hf:owner/name`` for a Hugging Face hub dataset, streamed so it never has to fit on disk;
* ``builtin:pystdlib``: the ``.py`` files of the running Python's standard library, the embedded
  default corpus that needs no network.

Everything is streamed, one document at a time, so no stage ever holds a corpus in memory.
The split into train and val is by document and deterministic: a document goes to val when a hash
of its text falls below ``data.val_fraction``. Hashing the text (not its position) keeps duplicate
documents on the same side, so the val split never leaks training text.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import logging
import os
import socket
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal
from urllib.parse import urlparse

from lmtrain.config import DataConfig
from lmtrain.errors import DataError, first_line

log = logging.getLogger(__name__)

Split = Literal["train", "val"]

# File suffix -> the `datasets` packaged loader that reads it.
LOADERS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
GLOB_CHARS = set("*?[")
HUB_PREFIX = "hf:"
BUILTIN_PREFIX = "builtin:"
BUILTINS = ("pystdlib",)


@dataclass(frozen=True)
class Document:
    text: str
    origin: str  # file (or dataset) it came from, for error messages and logs
    # data.format chat: the conversation (text is then its canonical JSON, what the split hashes);
    # with data.bad_records skip, a record that is not one comes through with ``bad`` saying why.
    messages: list | None = field(default=None, compare=False)
    bad: str | None = None
    part: int = 0  # which source of data.mixture it came from


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


def val_score(text: str) -> float:
    """A stable number in [0, 1) derived from the document's text."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def iter_split(data: DataConfig, split: Split) -> Iterator[Document]:
    """Documents of one split, in corpus order.

    With ``data.val_source`` the val split is that whole corpus and nothing is held out of
    ``data.source``; otherwise documents of ``data.source`` are divided by ``val_score``.
    """
    if data.val_source is not None:
        yield from (iter_corpus(data) if split == "train" else iter_documents(data.val_source, data))
        return
    want_val = split == "val"
    for doc in iter_corpus(data):
        if (val_score(doc.text) < data.val_fraction) == want_val:
            yield doc


def iter_both_splits(data: DataConfig) -> Iterator[tuple[Split, Document]]:
    """Every document of the run, labelled with its split, in one pass over ``data.source``.

    The same split as ``iter_split`` gives, without reading the corpus twice.
    """
    if data.val_source is not None:
        for doc in iter_corpus(data):
            yield "train", doc
        for doc in iter_documents(data.val_source, data):
            yield "val", doc
        return
    for doc in iter_corpus(data):
        yield ("val" if val_score(doc.text) < data.val_fraction else "train"), doc


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def iter_corpus(data: DataConfig) -> Iterator[Document]:
    """The documents of ``data.source``, or of every ``data.mixture`` source in turn, each marked
    with its source's index (``part``): a text source's documents come as text in a chat run."""
    if not data.mixture:
        yield from iter_documents(data.source, data)
        return
    for part, entry in enumerate(data.mixture):
        for doc in iter_documents(entry.source, data, entry.format or data.format):
            yield dataclasses.replace(doc, part=part)


def check_sources(data: DataConfig) -> None:
    """Fail fast, before any work starts, on a source that names nothing readable."""
    sources = [entry.source for entry in data.mixture] if data.mixture else [data.source]
    for source in (*sources, data.val_source):
        if source is None:
            continue
        if source.startswith(BUILTIN_PREFIX):
            _builtin_name(source)
        elif source.startswith(HUB_PREFIX):
            _check_hub_reachable(_hub_name(source))
        else:
            resolve_local_files(source)


def iter_documents(source: str, data: DataConfig, format: str | None = None) -> Iterator[Document]:
    """All non-empty documents of ``source``, capped at ``data.max_documents``.

    Documents that are empty or only whitespace are skipped: they carry nothing to learn and
    would only add end-of-text tokens.
    """
    count = 0
    chat = (format or data.format) == "chat"
    for doc in (_iter_conversations(source, data) if chat else _iter_raw(source, data)):
        if doc.bad is not None:
            yield doc  # counted by whoever reads the split, never a document
            continue
        if not doc.text.strip():
            continue
        yield doc
        count += 1
        if data.max_documents is not None and count >= data.max_documents:
            return


def _iter_raw(source: str, data: DataConfig) -> Iterator[Document]:
    if source.startswith(BUILTIN_PREFIX):
        _builtin_name(source)
        yield from _iter_pystdlib()
    elif source.startswith(HUB_PREFIX):
        yield from _iter_hub(_hub_name(source), data)
    else:
        # One `load_dataset` call per run of files with the same loader: the call itself costs
        # a good part of a second, so one call per file would make a directory of many small
        # files take minutes to read.
        files = [p for p in resolve_local_files(source) if p.stat().st_size > 0]
        for loader, group in itertools.groupby(files, key=_loader_for):
            yield from _iter_local_files(list(group), loader, data)


# --------------------------------------------------------------------------------------------
# Conversations (data.format: chat)
# --------------------------------------------------------------------------------------------

MAX_RECORD_BYTES = 64 << 20  # one JSONL line: memory stays bounded whatever the file holds
CHAT_FILE_TYPES = (".jsonl", ".ndjson", ".json", ".parquet")


def _iter_conversations(source: str, data: DataConfig) -> Iterator[Document]:
    """Conversation records of ``source`` as documents, each checked (``conversations.to_messages``);
    a bad record is a ``DataError`` naming ``file:line``, or with ``data.bad_records: skip`` a
    document carrying ``bad``."""
    from lmtrain.conversations import BadRecord, canonical_text, to_messages

    for origin, row in _iter_records(source, data):
        try:
            messages = to_messages(row)
        except BadRecord as exc:
            if data.bad_records == "error":
                raise DataError(f"{origin}: {exc} (data.bad_records: skip leaves such records out)") from None
            yield Document("", origin, None, str(exc))
            continue
        yield Document(canonical_text(messages), origin, messages)


def _iter_records(source: str, data: DataConfig) -> Iterator[tuple[str, object]]:
    if source.startswith(BUILTIN_PREFIX):
        raise DataError(f"data.source {source}: a text corpus; data.format chat needs conversation records "
                        "(JSONL, JSON, Parquet or hf:)")
    if source.startswith(HUB_PREFIX):
        name = _hub_name(source)
        _check_hub_reachable(name)
        load_dataset = _datasets_loader()
        try:
            for n, row in enumerate(load_dataset(name, data.hf_config, split=data.hf_split, streaming=True), 1):
                yield f"hf:{name} record {n}", row
        except Exception as exc:
            raise DataError(f"hf:{name}: cannot stream the dataset: {first_line(exc)}") from None
        return
    for path in resolve_local_files(source):
        suffix = path.suffix.lower()
        if suffix not in CHAT_FILE_TYPES:
            raise DataError(f"{path}: data.format chat reads conversation records from "
                            f"{', '.join(CHAT_FILE_TYPES)} files, not {suffix or 'a file without a suffix'}")
        if path.stat().st_size == 0:
            continue
        if suffix in (".jsonl", ".ndjson") or (suffix == ".json" and _first_byte(path) != b"["):
            yield from _iter_jsonl_records(path)
        else:
            for n, row in enumerate(_iter_loaded_rows(path, LOADERS[suffix]), 1):
                yield f"{path} record {n}", row


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4096).lstrip()[:1]


def _iter_jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    """One record per non-blank line, each parsed on its own so an error names its line."""
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(iter(lambda: f.readline(MAX_RECORD_BYTES + 1), b""), 1):
                if len(raw) > MAX_RECORD_BYTES:
                    raise DataError(f"{path}:{number}: a record of over {MAX_RECORD_BYTES >> 20} MB")
                if not raw.strip():
                    continue
                try:
                    yield f"{path}:{number}", json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{number}: not valid UTF-8") from None
                except ValueError as exc:
                    raise DataError(f"{path}:{number}: not valid JSON ({first_line(exc, 80)})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _iter_loaded_rows(path: Path, loader: str) -> Iterator[dict]:
    load_dataset = _datasets_loader()
    try:
        yield from load_dataset(loader, data_files=[str(path)], split="train", streaming=True)
    except Exception as exc:
        raise DataError(_explain_load_error(path, loader, exc)) from None


def _builtin_name(source: str) -> str:
    name = source[len(BUILTIN_PREFIX):]
    if name not in BUILTINS:
        raise DataError(f"data.source: unknown builtin corpus {name!r}; available: builtin:pystdlib")
    return name


def _hub_name(source: str) -> str:
    name = source[len(HUB_PREFIX):]
    if not name or name.count("/") > 1 or name.startswith("/") or name.endswith("/"):
        raise DataError(f"data.source: expected hf:owner/name, got {source}")
    return name


def resolve_local_files(source: str) -> list[Path]:
    """The files a local source names, sorted so every run reads them in the same order."""
    expanded = os.path.expanduser(source)
    if GLOB_CHARS & set(expanded):
        matches = _outside_runs(sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file()))
        if not matches:
            raise DataError(f"data.source: the glob {source!r} matches no files")
        unsupported = [p for p in matches if _loader_for(p) is None]
        if unsupported:
            raise DataError(
                f"data.source: {unsupported[0]} has an unsupported extension; "
                f"supported: {', '.join(sorted(LOADERS))}"
            )
        return matches
    path = Path(expanded)
    if path.is_dir():
        files = _outside_runs(sorted(p for p in path.rglob("*") if p.is_file() and _loader_for(p) is not None))
        if not files:
            raise DataError(
                f"data.source: directory {source} has no {', '.join(sorted(LOADERS))} files"
            )
        return files
    if not path.exists():
        raise DataError(f"data.source: no such file or directory: {source}")
    if _loader_for(path) is None:
        raise DataError(
            f"data.source: {source} has an unsupported extension; supported: {', '.join(sorted(LOADERS))}"
        )
    return [path]


def _outside_runs(files: list[Path]) -> list[Path]:
    """Drop files that live in an lmtrain run directory: a run kept under its own corpus (say
    ``data.source: .`` with ``runs/`` below it) must never read its tokenizer stats, manifest or
    logs back as text."""
    from lmtrain.rundir import is_run_dir

    verdicts: dict[Path, bool] = {}

    def in_run(directory: Path) -> bool:
        if directory not in verdicts:
            parent = directory.parent
            verdicts[directory] = is_run_dir(directory) or (parent != directory and in_run(parent))
        return verdicts[directory]

    # os.path.abspath folds `..` away: `cwd/../corpus` is not inside `cwd`, whatever `cwd` is.
    kept = [f for f in files if not in_run(Path(os.path.abspath(f.parent)))]
    if len(kept) < len(files):
        log.info("data.source: skipped %d file(s) inside lmtrain run directories", len(files) - len(kept))
    if files and not kept:
        raise DataError(f"data.source: all {len(files)} file(s) it names are inside lmtrain run directories "
                        "(their tokenizers, manifests and logs are never read as text); point it at the corpus")
    return kept


def _loader_for(path: Path) -> str | None:
    return LOADERS.get(path.suffix.lower())


def _iter_local_files(paths: list[Path], loader: str, data: DataConfig) -> Iterator[Document]:
    """Stream files through one `datasets` loader; an error names the file it came from."""
    if len(paths) == 1:
        yield from _iter_local_file(paths[0], loader, data)
        return
    try:
        yield from _iter_loaded(paths, loader, data, origin=f"{paths[0].parent}")
    except DataError:
        # Which file was it? Re-read them one at a time (only ever on this error path) so the
        # message names the file and the line, as it would for a single-file source.
        for path in paths:
            for _ in _iter_local_file(path, loader, data):
                pass
        raise


def _iter_local_file(path: Path, loader: str, data: DataConfig) -> Iterator[Document]:
    yield from _iter_loaded([path], loader, data, origin=str(path))


def _iter_loaded(paths: list[Path], loader: str, data: DataConfig, origin: str) -> Iterator[Document]:
    load_dataset = _datasets_loader()
    kwargs = {"sample_by": data.sample_by} if loader == "text" else {}
    path = paths[0]
    try:
        rows = load_dataset(loader, data_files=[str(p) for p in paths], split="train", streaming=True, **kwargs)
        for row in rows:
            if loader == "text":
                yield Document(row["text"], origin)
                continue
            if data.text_field not in row:
                _check_text_field(row, data.text_field, origin)
            text = row[data.text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(
                    f"{origin}: field {data.text_field!r} holds {type(text).__name__} values, not text"
                )
            yield Document(text, origin)
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{origin}: not valid UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}"
            " of a chunk); lmtrain does not guess encodings: convert the file to UTF-8"
        ) from None
    except Exception as exc:  # pyarrow / datasets parse errors: explain with the file's name
        raise DataError(_explain_load_error(path, loader, exc)) from None


def _datasets_loader():
    """``datasets.load_dataset``, imported lazily (it takes most of a second) and kept quiet:
    we turn its errors into our own one-line messages, so its own error logs would only
    repeat them."""
    import datasets

    logging.getLogger("datasets").setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    return datasets.load_dataset


def _check_text_field(row: dict, text_field: str, origin: str) -> None:
    if text_field not in row:
        have = ", ".join(repr(k) for k in row) or "none"
        raise DataError(
            f"{origin}: no field {text_field!r} (it has: {have}); set data.text_field to the column with the text"
        )


def _explain_load_error(path: Path, loader: str | None, exc: Exception) -> str:
    if loader == "json" and path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        bad_line = _first_bad_json_line(path)
        if bad_line is not None:
            return f"{path}: line {bad_line[0]} is not valid JSON ({bad_line[1]})"
    kind = {"json": "JSON", "parquet": "Parquet", "csv": "CSV", "text": "text"}.get(loader or "", "")
    return f"{path}: cannot read it as {kind}: {first_line(exc)}"


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    """Locate the first line of a JSON-lines file that does not parse, for a precise error."""
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except RecursionError:
                    return number, "nested too deeply"
                except json.JSONDecodeError as exc:
                    if number == 1:
                        # Maybe a single JSON document spread over lines (a .json file).
                        return None if _is_whole_json(path) else (number, exc.msg)
                    return number, exc.msg
                if not isinstance(value, dict):
                    return number, f"expected an object, got {type(value).__name__}"
    except UnicodeDecodeError as exc:
        return 0, f"not UTF-8 (bad byte at offset {exc.start})"
    return None


def _is_whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_text("utf-8"))
        return True
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return False


# --------------------------------------------------------------------------------------------
# The embedded corpus: Python's standard library
# --------------------------------------------------------------------------------------------

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def pystdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, test folders and site-packages excluded, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        files.extend(Path(dirpath) / name for name in filenames if name.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _iter_pystdlib() -> Iterator[Document]:
    files = pystdlib_files()
    if not files:
        raise DataError("builtin:pystdlib: this Python has no standard library sources on disk")
    for path in files:
        # A handful of stdlib files are not UTF-8 clean; replacement keeps the corpus the same
        # on every run rather than silently dropping files.
        yield Document(path.read_bytes().decode("utf-8", errors="replace"), str(path))


# --------------------------------------------------------------------------------------------
# Hugging Face hub datasets
# --------------------------------------------------------------------------------------------

HUB_TIMEOUT_S = 5.0


def _iter_hub(name: str, data: DataConfig) -> Iterator[Document]:
    _check_hub_reachable(name)
    load_dataset = _datasets_loader()

    try:
        rows = load_dataset(name, data.hf_config, split=data.hf_split, streaming=True)
        first = True
        for row in rows:
            if first:
                _check_text_field(row, data.text_field, f"hf:{name}")
                first = False
            text = row.get(data.text_field)
            if isinstance(text, str):
                yield Document(text, f"hf:{name}")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"hf:{name}: cannot stream the dataset: {first_line(exc)}") from None


def _check_hub_reachable(name: str) -> None:
    """Fail in seconds, not after minutes of retries, when the hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return  # offline mode: datasets reads its local cache or says it has none
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=HUB_TIMEOUT_S):
            pass
    except OSError as exc:
        raise DataError(
            f"hf:{name}: cannot reach the Hugging Face hub at {host}:{port} ({exc.strerror or exc}); "
            "hf: sources need the network; local files (a path, directory or glob) work offline"
        ) from None
