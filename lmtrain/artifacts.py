"""Do the run directory's artifacts agree with the config? One check, shared by every command.

Each artifact records what it was made from: the tokenizer its data and tokenizer settings
(``tokenizer/stats.json``), the shards their tokenizer and data settings (the manifest's
fingerprint), a checkpoint its tokenizer, model and config (``state.json``). Before a stage writes
anything it asks here whether what is already in the run directory was made from the config it
was given, and refuses with the difference and the command that fixes it otherwise: training on
shards of another corpus, or sharding with a tokenizer trained for another one, gives numbers
that look fine and are wrong.
"""

from __future__ import annotations

from lmtrain.config import Config
from lmtrain.errors import RunDirError
from lmtrain.rundir import data_dir, tokenizer_path


def check_tokenizer_agrees(config: Config) -> None:
    """The run's tokenizer (if any) was trained with this config's data and tokenizer sections."""
    from lmtrain.tokenizer import stale_tokenizer_reason

    if not tokenizer_path(config.run_dir).exists():
        return
    reason = stale_tokenizer_reason(config)
    if reason is not None:
        raise RunDirError(f"{reason}; the run's shards and checkpoints depend on it: start a new run "
                          "(another run.name), or retrain it with `lmtrain tokenize --force` (which moves "
                          "the old tokenizer, shards and checkpoints aside)")


def check_shards_agree(config: Config, tokenizer_sha256: str) -> None:
    """The run's shards (if any) were built from this tokenizer and this config's data section."""
    from lmtrain.errors import ShardError
    from lmtrain.shards import MANIFEST_NAME, read_manifest, shard_fingerprint

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
    differences = fingerprint_differences(manifest.fingerprint, shard_fingerprint(config, tokenizer_sha256))
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


def data_differences(checkpoint_config: dict, config: Config) -> list[str]:
    """The ``data.*`` settings a checkpoint was trained with that this config changes."""
    from dataclasses import asdict

    saved = checkpoint_config.get("data") if isinstance(checkpoint_config, dict) else None
    if not isinstance(saved, dict):
        return []
    return [f"data.{key}: checkpoint {saved[key]!r}, config {value!r}"
            for key, value in asdict(config.data).items() if key in saved and saved[key] != value]
