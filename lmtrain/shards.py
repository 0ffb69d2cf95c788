"""Token shards: the binary format training reads, its writer, reader, manifest and verifier.

Encoding a corpus into shards (the shard stage) is ``lmtrain.prepare.build_shards``; whether a
run's shards agree with its config and tokenizer is checked here (``check_shards_agree``).

A shard is a file of token ids behind a fixed 256-byte header:

    offset  size  field
    0       8     magic  b"LMTSHARD"
    8       4     format version (uint32, currently 1)
    12      4     bytes per token id: 2 (uint16) or 4 (uint32)
    16      8     number of token ids in the file (uint64)
    24      4     vocab size of the tokenizer (uint32)
    28      4     end-of-text id (uint32)
    32      32    sha256 of the tokenizer.json that produced it (raw bytes)
    64      192   reserved, zero
    256     ...   token ids, little-endian
    ...     ...   version 2 only: one flag byte per token id (the loss mask, below)

Version 1 shards (plain text) hold ids only and read as if every token were trained on. Version 2
(``data.format: chat``) adds the loss mask after the ids: per token, bit 0 says the loss covers it
as a target (an assistant's content or the end-of-turn token closing it) and bit 1 marks the
first token of a conversation, whose bits 2-7 also number its ``data.mixture`` source (a text
source's documents are stored the same way, every token trained). A conversation never
straddles two shards (a shard ends early rather than split one), so it is one slice of one file.

All integers are little-endian. ``uint16`` is used whenever every id fits (vocab <= 65536).
Each document's ids are followed by the end-of-text id and documents are concatenated, one
stream per split (GPT-2's convention), cut into files of ``shard.shard_tokens`` ids.

``data/manifest.json`` lists every shard with its split, token, document and UTF-8 byte counts
and its sha256. It is written last: a data directory without a manifest is incomplete.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtrain.config import Config, data_settings
from lmtrain.corpus import Split
from lmtrain.errors import RunDirError, ShardError, first_line
from lmtrain.fsutil import TMP_MARKER, commit_tmp, describe_os_error, read_json, sha256_file, tmp_name
from lmtrain.rundir import data_dir, tokenizer_dir

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"LMTSHARD"
FORMAT_VERSION = 1  # plain text: ids only
MASKED_VERSION = 2  # conversations: ids, then one flag byte per id
READABLE_VERSIONS = (FORMAT_VERSION, MASKED_VERSION)
TRAINED, CONVERSATION_START = 1, 2  # the flag bits of a version-2 shard's mask
PART_SHIFT = 2  # bits 2-7 of a conversation's first flag byte: its data.mixture source
HEADER_BYTES = 256
_HEADER = struct.Struct("<8sIIQII32s")
MANIFEST_NAME = "manifest.json"
SPLITS: tuple[Split, ...] = ("train", "val")


# --------------------------------------------------------------------------------------------
# Header
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardHeader:
    dtype: str  # "uint16" or "uint32"
    tokens: int
    vocab_size: int
    eot_id: int
    tokenizer_sha256: str
    version: int = FORMAT_VERSION

    def pack(self) -> bytes:
        itemsize = 2 if self.dtype == "uint16" else 4
        raw = _HEADER.pack(MAGIC, self.version, itemsize, self.tokens, self.vocab_size,
                           self.eot_id, bytes.fromhex(self.tokenizer_sha256))
        return raw.ljust(HEADER_BYTES, b"\0")

    @classmethod
    def unpack(cls, raw: bytes, path: Path) -> "ShardHeader":
        if len(raw) < HEADER_BYTES:
            raise ShardError(f"{path}: truncated: {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte header")
        magic, version, itemsize, tokens, vocab, eot, sha = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise ShardError(f"{path}: not an lmtrain shard (wrong magic {magic!r}, expected {MAGIC!r})")
        if version not in READABLE_VERSIONS:
            raise ShardError(f"{path}: shard format version {version}, this lmtrain reads "
                             f"{' and '.join(map(str, READABLE_VERSIONS))}")
        if itemsize not in (2, 4):
            raise ShardError(f"{path}: invalid token width {itemsize} bytes in the header")
        return cls("uint16" if itemsize == 2 else "uint32", tokens, vocab, eot, sha.hex(), version)

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "uint16" else 4

    @property
    def masked(self) -> bool:
        return self.version == MASKED_VERSION

    @property
    def file_bytes(self) -> int:
        return shard_file_bytes(self.tokens, self.itemsize, self.masked)


def shard_file_bytes(tokens: int, itemsize: int, masked: bool) -> int:
    return HEADER_BYTES + tokens * itemsize + (tokens if masked else 0)


def dtype_for_vocab(vocab_size: int) -> str:
    """The narrowest id type that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def read_header(path: Path) -> ShardHeader:
    try:
        with open(path, "rb") as f:
            return ShardHeader.unpack(f.read(HEADER_BYTES), path)
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file is missing; re-run `lmtrain shard --force`") from None


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


@dataclass
class ShardRecord:
    file: str
    split: str
    tokens: int
    documents: int
    utf8_bytes: int
    sha256: str


class ShardWriter:
    """Writes one split's token stream into shard files of at most ``shard_tokens`` ids.

    A shard is filled under a temporary name and renamed into place only when it is complete,
    with its final header; ``abort`` removes whatever is half-written.
    """

    def __init__(self, directory: Path, split: str, shard_tokens: int, vocab_size: int,
                 eot: int, tokenizer_sha256: str, masked: bool = False) -> None:
        import numpy as np

        self.masked = masked
        self._mask_file = None
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.vocab_size, self.eot, self.tokenizer_sha256 = vocab_size, eot, tokenizer_sha256
        self.dtype = dtype_for_vocab(vocab_size)
        self._np_dtype = np.dtype(self.dtype).newbyteorder("<")
        self.records: list[ShardRecord] = []
        self.trained_tokens = 0  # masked: ids the loss covers
        # How often each byte value occurs in the split's text: the unigram byte baseline.
        self.byte_counts = np.zeros(256, dtype=np.int64)
        self._file = None
        self._tmp: Path | None = None
        self._tokens = self._documents = self._bytes = 0

    def write_document(self, ids: "np.ndarray", utf8_bytes: int) -> None:
        """Append one document's ids (end-of-text included); it may straddle shards.

        Its document and byte counts go to the shard where it ends.
        """
        assert not self.masked, "a masked writer takes conversations (write_conversation)"
        start = 0
        while start < len(ids):
            if self._file is None:
                self._open()
            take = min(len(ids) - start, self.shard_tokens - self._tokens)
            self._file.write(ids[start : start + take].astype(self._np_dtype, copy=False).tobytes())
            self._tokens += take
            start += take
            if start == len(ids):
                self._documents += 1
                self._bytes += utf8_bytes
            if self._tokens == self.shard_tokens:
                self._finish()

    def write_conversation(self, ids: "np.ndarray", mask: "np.ndarray", utf8_bytes: int, part: int = 0) -> int:
        """Append one conversation's ids and flags (bit 0 of ``mask``: trained) whole, in one shard:
        the shard ends early when it would not fit. One longer than a shard is cut to it. ``part``:
        its data.mixture source, kept in its first flag byte. Returns the ids written."""
        import numpy as np

        if self._file is not None and self._tokens + len(ids) > self.shard_tokens:
            self._finish()
        ids, mask = ids[: self.shard_tokens], mask[: self.shard_tokens]
        if self._file is None:
            self._open()
        flags = (mask & TRAINED).astype(np.uint8)
        flags[:1] |= CONVERSATION_START | (part << PART_SHIFT)
        self._file.write(ids.astype(self._np_dtype, copy=False).tobytes())
        self._mask_file.write(flags.tobytes())
        self._tokens += len(ids)
        self._documents += 1
        self._bytes += utf8_bytes
        self.trained_tokens += int((flags & TRAINED).sum())
        if self._tokens == self.shard_tokens:
            self._finish()
        return len(ids)

    def close(self) -> list[ShardRecord]:
        if self._file is not None:
            self._finish()
        return self.records

    def abort(self) -> None:
        """Remove a half-written shard. Never raises: it runs while another error is on its way
        (closing a file on a full disk fails too), and must not mask it."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
            if self._tmp is not None:
                with contextlib.suppress(OSError):
                    self._tmp.unlink(missing_ok=True)
        if self._mask_file is not None:
            with contextlib.suppress(OSError):
                self._mask_file.close()
                Path(self._mask_file.name).unlink(missing_ok=True)
            self._mask_file = None

    def _path(self, index: int) -> Path:
        return self.directory / f"{self.split}-{index:05d}.bin"

    def _open(self) -> None:
        self._tmp = tmp_name(self._path(len(self.records)))
        self._file = open(self._tmp, "wb")
        self._file.write(b"\0" * HEADER_BYTES)  # the real header goes in once the count is known
        if self.masked:  # the flags go to a file of their own until the ids are complete
            self._mask_file = open(tmp_name(self._path(len(self.records)).with_suffix(".mask")), "w+b")
        self._tokens = self._documents = self._bytes = 0

    def _finish(self) -> None:
        header = ShardHeader(self.dtype, self._tokens, self.vocab_size, self.eot, self.tokenizer_sha256,
                             MASKED_VERSION if self.masked else FORMAT_VERSION)
        if self._mask_file is not None:
            self._mask_file.seek(0)
            shutil.copyfileobj(self._mask_file, self._file)
            self._mask_file.close()
            Path(self._mask_file.name).unlink()
            self._mask_file = None
        self._file.seek(0)
        self._file.write(header.pack())
        self._file.close()
        self._file = None
        path = self._path(len(self.records))
        digest = sha256_file(self._tmp)
        commit_tmp(self._tmp, path)
        self.records.append(ShardRecord(path.name, self.split, self._tokens, self._documents,
                                        self._bytes, digest))


# --------------------------------------------------------------------------------------------
# The shard stage
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def shard_fingerprint(config: Config, tokenizer_sha256: str, bos: list[int] | None = None,
                      chat_template: str | None = None) -> dict[str, Any]:
    """Everything the shards' content depends on: when it is unchanged, they are up to date.
    ``bos``: the ids before every document (a source tokenizer's BOS; none for lmtrain's own).
    Conversations also depend on the chat template and on what the loss covers (the mask)."""
    chat = config.data.format == "chat"
    data = data_settings(config.data)
    # Text shards do not depend on the chat-only keys at all (and shards made before they existed
    # stay current).
    for key in () if chat else CHAT_DATA_KEYS:
        data.pop(key, None)
    if not data.get("mixture"):
        data.pop("mixture", None)  # shards made before mixtures existed stay current
    fingerprint = {
        "format_version": MASKED_VERSION if chat else FORMAT_VERSION,
        "tokenizer_sha256": tokenizer_sha256,
        "special_tokens": list(config.tokenizer.special_tokens),
        "data": data,
        "shard_tokens": config.shard.shard_tokens,
    }
    if bos:
        fingerprint["bos"] = list(bos)
    if chat:
        fingerprint["loss_on"] = config.train.loss_on
        fingerprint["chat_template_sha256"] = hashlib.sha256((chat_template or "").encode()).hexdigest()
    return fingerprint


CHAT_DATA_KEYS = ("format", "bad_records")


@dataclass
class SplitTotals:
    """One split's totals: training uses ``utf8_bytes`` for bits per byte, and ``byte_counts`` (how
    often each byte value occurs in the split's text) gives the unigram byte baseline."""

    shards: int
    tokens: int
    documents: int
    utf8_bytes: int
    byte_counts: list[int] | None = None
    # Conversations: the ids the loss covers; ``utf8_bytes`` then counts the assistant's text only,
    # so bits per byte are per byte of what is trained.
    trained_tokens: int | None = None
    skipped_records: int | None = None  # data.bad_records: skip

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()
                if v is not None or k not in ("byte_counts", "trained_tokens", "skipped_records")}


@dataclass
class Manifest:
    """``data/manifest.json``: what the shards hold and what made them."""

    format_version: int
    tokenizer_sha256: str
    vocab_size: int
    dtype: str
    eot_id: int
    header_bytes: int
    fingerprint: dict[str, Any]
    splits: dict[str, SplitTotals]
    shards: list[ShardRecord]

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "uint16" else 4

    @property
    def masked(self) -> bool:
        return self.format_version == MASKED_VERSION

    def entries(self, split: str) -> list[ShardRecord]:
        return [entry for entry in self.shards if entry.split == split]

    def to_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in ("format_version", "tokenizer_sha256", "vocab_size", "dtype",
                                                  "eot_id", "header_bytes", "fingerprint")},
                "splits": {name: totals.to_dict() for name, totals in self.splits.items()},
                "shards": [asdict(entry) for entry in self.shards]}

    @classmethod
    def from_dict(cls, raw: Any, path: Path) -> "Manifest":
        """Validate what ``manifest.json`` holds; a ``ShardError`` naming the file if it is off."""
        missing = [k for k in _MANIFEST_KEYS if not isinstance(raw, dict) or k not in raw]
        if missing:
            raise ShardError(f"{path} is missing {', '.join(missing)}; re-run `lmtrain shard --force`")
        if raw["format_version"] not in READABLE_VERSIONS:
            raise ShardError(f"{path}: format version {raw['format_version']}, this lmtrain reads "
                             f"{' and '.join(map(str, READABLE_VERSIONS))}")
        try:
            splits = {name: SplitTotals(**totals) for name, totals in raw["splits"].items()}
            shards = [ShardRecord(**entry) for entry in raw["shards"]]
        except (TypeError, AttributeError) as exc:
            raise ShardError(f"{path}: malformed splits or shards ({exc}); re-run `lmtrain shard --force`") from None
        for entry in shards:
            _safe_shard_name(entry.file, path)
        return cls(raw["format_version"], raw["tokenizer_sha256"], raw["vocab_size"], raw["dtype"],
                   raw["eot_id"], raw.get("header_bytes", HEADER_BYTES), raw.get("fingerprint", {}),
                   splits, shards)

    def unigram_byte_bpb(self) -> float | None:
        """Bits per byte of the val split under a unigram byte model fitted on the train split.

        The floor any language model must clear: it knows how often each byte occurs, nothing
        more. Add-one smoothing keeps bytes unseen in training finite.
        """
        import numpy as np

        train, val = self.splits.get("train"), self.splits.get("val")
        if train is None or val is None or train.byte_counts is None or val.byte_counts is None:
            return None
        train_counts = np.asarray(train.byte_counts, dtype=np.float64) + 1.0
        val_counts = np.asarray(val.byte_counts, dtype=np.float64)
        if val_counts.sum() == 0:
            return None
        return float(-(val_counts * np.log2(train_counts / train_counts.sum())).sum() / val_counts.sum())


def make_manifest(fingerprint: dict, records: list[ShardRecord], vocab_size: int, eot: int,
                  tokenizer_sha256: str, byte_counts: dict[str, list[int]] | None = None,
                  conversations: dict[str, dict[str, int]] | None = None) -> Manifest:
    """``conversations``: per split, ``trained_tokens`` and ``skipped_records`` (chat shards)."""
    splits = {}
    for split in SPLITS:
        mine = [r for r in records if r.split == split]
        splits[split] = SplitTotals(shards=len(mine), tokens=sum(r.tokens for r in mine),
                                    documents=sum(r.documents for r in mine),
                                    utf8_bytes=sum(r.utf8_bytes for r in mine),
                                    byte_counts=byte_counts[split] if byte_counts is not None else None,
                                    **(conversations or {}).get(split, {}))
    return Manifest(fingerprint.get("format_version", FORMAT_VERSION), tokenizer_sha256, vocab_size,
                    dtype_for_vocab(vocab_size), eot, HEADER_BYTES, fingerprint, splits, list(records))


_MANIFEST_KEYS = ("format_version", "tokenizer_sha256", "vocab_size", "dtype", "eot_id", "splits", "shards")


def read_manifest(directory: Path) -> Manifest:
    recover_interrupted_swap(directory)
    path = directory / MANIFEST_NAME
    if not path.exists():
        raise ShardError(f"no shards at {directory} (no {MANIFEST_NAME}); run `lmtrain shard` first")
    try:
        raw = read_json(path)
    except ValueError as exc:
        raise ShardError(f"{path} is not valid JSON ({first_line(exc, 80)}); re-run `lmtrain shard --force`") from None
    except OSError as exc:
        raise ShardError(f"cannot read {path}: {describe_os_error(exc)}") from None
    return Manifest.from_dict(raw, path)


def _safe_shard_name(name: Any, manifest_path: Path) -> str:
    """A shard named by the manifest must be a plain file name inside the data directory."""
    if (not isinstance(name, str) or not name or name != Path(name).name or name in (".", "..")
            or "/" in name or "\\" in name or TMP_MARKER in name):
        raise ShardError(f"{manifest_path}: refusing shard name {name!r}: it must be a plain file name "
                         "inside the data directory")
    return name


# --------------------------------------------------------------------------------------------
# Reader and verifier
# --------------------------------------------------------------------------------------------


def _check_shard(path: Path, entry: ShardRecord, manifest: Manifest) -> ShardHeader:
    """Header and size of one shard against its manifest entry (no hashing)."""
    if path.is_symlink():
        raise ShardError(f"{path} is a symbolic link; shards must be plain files inside the data directory")
    header = read_header(path)
    expected = {
        "dtype": manifest.dtype, "tokens": entry.tokens, "vocab_size": manifest.vocab_size,
        "eot_id": manifest.eot_id, "tokenizer_sha256": manifest.tokenizer_sha256,
        "version": manifest.format_version,
    }
    for key, want in expected.items():
        got = getattr(header, key)
        if got != want:
            raise ShardError(f"{path}: header {key} is {got!r} but the manifest says {want!r}")
    size = path.stat().st_size
    if size != header.file_bytes:
        what = "truncated" if size < header.file_bytes else "has trailing bytes"
        raise ShardError(f"{path}: {what}: {size} bytes, the header promises {header.file_bytes}; "
                         "re-run `lmtrain shard --force`")
    return header


def out_of_vocabulary(where: Any, token_id: int, vocab_size: int) -> ShardError:
    """A token id past the vocabulary in shards whose header, size and manifest are fine: their
    content changed after they were written (a bit flip, an edit)."""
    return ShardError(f"{where}: token id {token_id} is outside the vocabulary of {vocab_size}: the shard is "
                      "corrupt (`lmtrain shard --verify` names it); rebuild with `lmtrain shard --force`")


def open_split(directory: Path, split: str, tokenizer_sha256: str | None = None) -> list["np.memmap"]:
    """The split's shards as read-only ``numpy.memmap`` views of their token ids, in order.

    Every header is checked against the manifest first; with ``tokenizer_sha256`` the manifest
    must also come from that tokenizer. A mismatch is a ``ShardError``, never garbage tokens.
    """
    import numpy as np

    manifest = read_manifest(directory)
    if tokenizer_sha256 is not None and manifest.tokenizer_sha256 != tokenizer_sha256:
        raise ShardError(
            f"the shards in {directory} were made with another tokenizer (sha256 "
            f"{manifest.tokenizer_sha256[:12]}…, the run's is {tokenizer_sha256[:12]}…); "
            "re-run `lmtrain shard --force`"
        )
    arrays = []
    for entry in manifest.entries(split):
        path = directory / entry.file
        header = _check_shard(path, entry, manifest)
        if header.tokens:
            arrays.append(np.memmap(path, dtype=np.dtype(header.dtype).newbyteorder("<"), mode="r",
                                    offset=HEADER_BYTES, shape=(header.tokens,)))
    if not arrays:
        raise ShardError(f"{directory}: the manifest lists no {split} tokens; re-run `lmtrain shard --force`")
    return arrays


def open_masks(directory: Path, split: str) -> list["np.memmap"] | None:
    """The flag bytes (``TRAINED``, ``CONVERSATION_START``) of each of the split's shards, in
    ``open_split``'s order, or None for text shards (every token trained on)."""
    import numpy as np

    manifest = read_manifest(directory)
    if not manifest.masked:
        return None
    masks = []
    for entry in manifest.entries(split):
        path = directory / entry.file
        header = _check_shard(path, entry, manifest)
        if header.tokens:
            masks.append(np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_BYTES + header.tokens * header.itemsize,
                                   shape=(header.tokens,)))
    return masks


@dataclass
class VerifyResult:
    shards: int
    tokens: int
    bytes_read: int


def verify_shards(directory: Path, tokenizer_sha256: str | None = None) -> VerifyResult:
    """Re-read every shard: header, size and sha256 against the manifest; the first problem raises."""
    manifest = read_manifest(directory)
    if tokenizer_sha256 is not None and manifest.tokenizer_sha256 != tokenizer_sha256:
        raise ShardError(
            f"{directory / MANIFEST_NAME}: made with tokenizer sha256 {manifest.tokenizer_sha256[:12]}…, "
            f"but the run's tokenizer.json is {tokenizer_sha256[:12]}…; re-run `lmtrain shard --force`"
        )
    tokens = bytes_read = 0
    for split in SPLITS:
        listed = sum(e.tokens for e in manifest.entries(split))
        totals = manifest.splits.get(split)
        total = totals.tokens if totals is not None else None
        if listed != total:
            raise ShardError(f"{directory / MANIFEST_NAME}: the {split} shards add up to "
                             f"{listed} tokens but the split total says {total}")
    for entry in manifest.shards:
        path = directory / entry.file
        _check_shard(path, entry, manifest)
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise ShardError(f"{path}: sha256 {digest[:12]}… does not match the manifest's "
                             f"{entry.sha256[:12]}… (the file changed after it was written)")
        tokens += entry.tokens
        bytes_read += path.stat().st_size
    return VerifyResult(len(manifest.shards), tokens, bytes_read)


# --------------------------------------------------------------------------------------------
# Do the shards agree with the config?
# --------------------------------------------------------------------------------------------


def check_shards_agree(config: Config, tokenizer_sha256: str) -> None:
    """The run's shards (if any) were built from this tokenizer and this config's data section:
    training on shards of another corpus gives numbers that look fine and are wrong."""
    directory = data_dir(config.run_dir)
    if not (directory / MANIFEST_NAME).exists():
        return
    try:
        manifest = read_manifest(directory)
    except ShardError:
        return  # the reader names what is wrong with it when training opens the shards
    if manifest.tokenizer_sha256 != tokenizer_sha256:
        raise RunDirError(f"the shards in {directory} were made with another tokenizer than the run's "
                          "tokenizer.json; rebuild them with `lmtrain shard` before training")
    template = None
    if config.data.format == "chat":
        from lmtrain.chat_template import load_template

        template = load_template(tokenizer_dir(config.run_dir), config.tokenizer.special_tokens[0]).source
    differences = fingerprint_differences(manifest.fingerprint, shard_fingerprint(
        config, tokenizer_sha256, manifest.fingerprint.get("bos") if isinstance(manifest.fingerprint, dict) else None,
        template))
    if differences:
        raise RunDirError(f"the shards in {directory} were built with {differences[0]}; rebuild them "
                          "with `lmtrain shard` before training")


def fingerprint_differences(built: dict, wanted: dict) -> list[str]:
    """``data.source 'a', the config says 'b'`` for each setting the two fingerprints disagree on."""
    out = []
    for key, value in wanted.items():
        have = built.get(key)
        if isinstance(value, dict) and isinstance(have, dict):
            out += [f"{key}.{k} {have.get(k)!r}, the config says {v!r}" for k, v in value.items()
                    if k in have and have[k] != v]
        elif have != value:
            out.append(f"{key} {have!r}, the config says {value!r}")
    return out


def old_name(out: Path) -> Path:
    return out.with_name(out.name + ".old")


def recover_interrupted_swap(out: Path) -> None:
    old = old_name(out)
    if not out.exists() and (old / MANIFEST_NAME).is_file():
        old.rename(out)
        log.warning("restored %s from an interrupted shard swap", out)
