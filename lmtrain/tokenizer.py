"""The run's byte-level tokenizer: the format, loading it, and whether it agrees with the config.

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
would no longer be x. Training one (the tokenize stage) is ``lmtrain.prepare.train_tokenizer``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from lmtrain.config import Config, adopted, data_settings
from lmtrain.errors import RunDirError, TokenizerError, first_line, quoted
from lmtrain.fsutil import read_json
from lmtrain.rundir import tokenizer_dir, tokenizer_path

if TYPE_CHECKING:
    from tokenizers import Tokenizer

ENCODE_BATCH_DOCS = 256
# stats.json's settings list under "chosen" what lmtrain picked for the corpus: so far only this
VOCAB_KEY = "tokenizer.vocab_size"


def tokenizer_settings(config: Config) -> dict:
    """What a trained tokenizer depends on: if these change, it is stale."""
    return {"tokenizer": asdict(config.tokenizer), "data": data_settings(config.data)}


def _saved_settings(run_dir: Path) -> dict | None:
    """The settings the run's tokenizer was trained with (stats.json), None if it cannot tell."""
    try:
        saved = read_json(tokenizer_dir(run_dir) / "stats.json").get("settings")
    except (OSError, ValueError, AttributeError):
        return None
    return saved if isinstance(saved, dict) else None


def _with_choices(config: Config, saved: dict) -> Config:
    """``config`` with the vocabulary lmtrain chose for the run's corpus (``chosen``,
    ``small_data.corpus_vocab``) while the config leaves it unset; a value the user sets stays
    theirs, to be compared with what was trained."""
    listed, trained = saved.get("chosen"), saved.get("tokenizer")
    if not isinstance(listed, list) or VOCAB_KEY not in listed or VOCAB_KEY in config.given:
        return config
    if not isinstance(trained, dict):
        return config
    # checked as a config file's value would be; a crafted stats.json's is compared, not adopted
    return adopted(config, "tokenizer", {"vocab_size": trained.get("vocab_size")}, "the run's tokenizer/stats.json")


def run_tokenizer_config(config: Config) -> Config:
    """``config`` as the run's tokenizer was trained: with what lmtrain chose for its corpus where
    the config leaves it unset (what each stage then writes into the run's config.yaml)."""
    saved = _saved_settings(config.run_dir)
    return config if saved is None else _with_choices(config, saved)


def stale_tokenizer_reason(config: Config) -> str | None:
    """Why the run's tokenizer does not match ``config`` (None if it does, or cannot tell)."""
    saved = _saved_settings(config.run_dir)
    if saved is None:
        return None
    current = tokenizer_settings(_with_choices(config, saved))
    for section in ("tokenizer", "data"):
        trained = saved.get(section)
        for key, value in current[section].items() if isinstance(trained, dict) else ():
            if key in trained and trained[key] != value:
                return (f"the run's tokenizer was trained with {section}.{key}={trained[key]!r}, "
                        f"the config now says {value!r}")
    return None


def check_tokenizer_agrees(config: Config) -> None:
    """The run's tokenizer (if any) was trained with this config's data and tokenizer sections."""
    if not tokenizer_path(config.run_dir).exists():
        return
    reason = stale_tokenizer_reason(config)
    if reason is not None:
        raise RunDirError(f"{reason}; the run's shards and checkpoints depend on it: start a new run "
                          "(another run.name), or retrain it with `lmtrain tokenize --force` (which moves "
                          "the old tokenizer, shards and checkpoints aside)")


# A source's tokenizer files beside tokenizer.json, copied into the run as they are: transformers
# reads BOS/EOS and the chat template from them, and every export writes them back.
SOURCE_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                          "generation_config.json")


def bos_ids(tokenizer: "Tokenizer", tokenizer_config: dict | None = None) -> list[int]:
    """The ids transformers' tokenizer puts before every text (its BOS): what the tokenizer's
    post-processor adds in front, as ``tokenizer_config.json``'s ``add_bos_token`` sets it (Llama
    2/3 and TinyLlama add one, SmolLM2 and Qwen none, lmtrain's own tokenizers none)."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    prefix = full[:at]
    add = (tokenizer_config or {}).get("add_bos_token")
    if add is False:
        return []
    if add is True and not prefix:
        token = (tokenizer_config or {}).get("bos_token")
        token = token.get("content") if isinstance(token, dict) else token
        bos = tokenizer.token_to_id(token) if isinstance(token, str) else None
        return [bos] if bos is not None else []
    return prefix


def run_bos_ids(run_dir: Path, tokenizer: "Tokenizer | None" = None) -> list[int]:
    """``bos_ids`` of the run's tokenizer, with the tokenizer_config.json copied beside it."""
    return bos_ids_in(tokenizer_dir(run_dir), tokenizer or load_tokenizer(run_dir))


def bos_ids_in(directory: Path, tokenizer: "Tokenizer") -> list[int]:
    """``bos_ids`` of ``tokenizer`` as the tokenizer_config.json in ``directory`` (if any) sets it."""
    config_file = directory / "tokenizer_config.json"
    try:
        tokenizer_config = read_json(config_file, 16 << 20) if config_file.is_file() else None
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{config_file} is not readable JSON ({first_line(exc, 80)})") from None
    return bos_ids(tokenizer, tokenizer_config if isinstance(tokenizer_config, dict) else None)


def build_tokenizer(model: str = "bpe") -> "Tokenizer":
    """An untrained byte-level tokenizer (model, pre-tokenizer, decoder): ``bpe`` or ``unigram``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE() if model == "bpe" else models.Unigram())
    # add_prefix_space=False: a leading space would be added on encode and kept on decode,
    # breaking the exact round trip.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


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
        raise TokenizerError(
            f"{path} is not a valid tokenizer ({first_line(exc)}); re-run `lmtrain tokenize --force`"
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


def check_specials_are_single_ids(tokenizer: "Tokenizer", specials: list[str]) -> None:
    for tok in specials:
        ids = tokenizer.encode(tok, add_special_tokens=False).ids
        if len(ids) != 1:  # a copied tokenizer that lacks it (a trained one always has its specials)
            raise TokenizerError(f"tokenizer.special_tokens: {quoted(tok)} is not one token of the tokenizer "
                                 f"(it encodes to {len(ids)} ids); remove it, or use a tokenizer that has it")


