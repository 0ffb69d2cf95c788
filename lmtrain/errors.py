"""Errors that are the user's to fix.

Everything raised as an ``LmtrainError`` is a mistake in the input (a config, a corpus, a run
directory) or an environment problem the user can act on. The CLI prints its message as one line
on stderr and exits with code 2. Anything else that escapes is a bug of ours and keeps its
traceback.
"""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message for a one-line error: its first line, at most ``limit`` characters
    (a library's message can quote a whole file), or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def quoted(value: object, limit: int = 40) -> str:
    """``repr(value)``, cut to about ``limit`` characters: what a message may quote of a file."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class LmtrainError(Exception):
    """Base class: a problem the user can fix, explained in one line."""


class ConfigError(LmtrainError):
    """The config file, a ``--set`` override or a config value is wrong."""


class DataError(LmtrainError):
    """The corpus cannot be read: missing, empty, malformed, unreachable."""


class TokenizerError(LmtrainError):
    """The run's tokenizer is missing, corrupt or does not match."""


class ShardError(LmtrainError):
    """Shards or their manifest are missing, corrupt or do not match."""


class CheckpointError(LmtrainError):
    """A checkpoint is missing, incomplete, corrupt or does not match the config."""


class RunDirError(LmtrainError):
    """The run directory cannot be used (a file, not writable, already has artifacts)."""
