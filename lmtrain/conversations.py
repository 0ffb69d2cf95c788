"""Conversation records: the shapes chat data comes in, normalised to OpenAI-style messages, and
a conversation encoded to token ids with the loss mask.

Accepted record shapes (one per JSONL line, JSON array element, Parquet row or hub row):

* OpenAI ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
* ShareGPT ``{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}``
  (``user``/``assistant``/``bot``/``model`` are accepted as ``from`` too)
* Alpaca ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional; joined to the
  instruction by a blank line, as Alpaca's own prompt does)
* ``{"prompt": ..., "completion": ...}``

A record is valid when its roles are known, every content is a string, the first non-system
message is the user's, and at least one assistant message has non-empty content (a conversation
with nothing to learn is a mistake in the data, not a no-op).
"""

from __future__ import annotations

import json
from typing import Any

from lmtrain.errors import DataError

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "bot": "assistant", "model": "assistant"}
ROLES = ("system", "user", "assistant")


class BadRecord(DataError):
    """One record is not a conversation; ``data.bad_records: skip`` counts these instead."""


def to_messages(row: Any) -> list[dict[str, str]]:
    """The record as a list of ``{"role", "content"}`` messages, or ``BadRecord`` saying why not."""
    if not isinstance(row, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return _checked(_openai(row["messages"], "messages", "role", "content", None))
    if "conversations" in row:
        return _checked(_openai(row["conversations"], "conversations", "from", "value", SHAREGPT_ROLES))
    if "instruction" in row and "output" in row:
        instruction, extra, output = row["instruction"], row.get("input") or "", row["output"]
        _strings(("instruction", instruction), ("input", extra), ("output", output))
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return _checked([{"role": "user", "content": user}, {"role": "assistant", "content": output}])
    if "prompt" in row and "completion" in row:
        _strings(("prompt", row["prompt"]), ("completion", row["completion"]))
        return _checked([{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}])
    have = ", ".join(repr(k) for k in list(row)[:8]) or "none"
    raise BadRecord(f"no conversation in the record (fields: {have}); expected 'messages', 'conversations', "
                    "'instruction'+'output' or 'prompt'+'completion'")


def _strings(*fields: tuple[str, Any]) -> None:
    for name, value in fields:
        if not isinstance(value, str):
            raise BadRecord(f"{name!r} must be a string, got {type(value).__name__}")


def _openai(turns: Any, field: str, role_key: str, content_key: str, role_names: dict | None) -> list[dict]:
    if not isinstance(turns, list):
        raise BadRecord(f"{field!r} must be a list of messages, got {type(turns).__name__}")
    messages = []
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise BadRecord(f"{field}[{n}] must be an object, got {type(turn).__name__}")
        role, content = turn.get(role_key), turn.get(content_key)
        if not isinstance(role, str):
            raise BadRecord(f"{field}[{n}] has no {role_key!r} string")
        name = (role_names or {r: r for r in ROLES}).get(role)
        if name is None:
            raise BadRecord(f"{field}[{n}]: unknown role {role[:40]!r} (known: {', '.join(role_names or ROLES)})")
        if not isinstance(content, str):
            raise BadRecord(f"{field}[{n}]: {content_key!r} must be a string, got {type(content).__name__}")
        messages.append({"role": name, "content": content})
    return messages


def _checked(messages: list[dict]) -> list[dict]:
    talk = [m for m in messages if m["role"] != "system"]
    if not talk:
        raise BadRecord("the conversation has no user or assistant message")
    if talk[0]["role"] != "user":
        raise BadRecord("the conversation must start with a user message (after any system message)")
    if any(m["role"] == "system" for m in messages[1:]):
        raise BadRecord("a system message may only come first")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRecord("the conversation has no assistant message with content (nothing to learn)")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        raise BadRecord("an assistant message is empty")
    return messages


def canonical_text(messages: list[dict]) -> str:
    """One stable string per conversation: what the train/val split hashes."""
    return json.dumps(messages, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def encode(tokenizer, template, messages: list[dict], specials: frozenset[str], loss_on: str):
    """Token ids of the rendered conversation and, per id, whether the loss covers it (1) or not
    (0): the assistant's contents and the end-of-turn tokens closing them, or every id with
    ``loss_on: all``. Rendered ids only: the template writes any BOS itself (as transformers'
    ``apply_chat_template`` tokenizes, without adding special tokens)."""
    import numpy as np

    text, spans = template.assistant_spans(messages, specials)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, dtype=np.int64)
    if loss_on == "all":
        return ids, np.ones(len(ids), dtype=np.uint8)
    mask = np.zeros(len(ids), dtype=np.uint8)
    if len(ids):
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        for start, end in spans:
            mask |= ((offsets[:, 0] < end) & (offsets[:, 1] > start)).astype(np.uint8)
    return ids, mask


def trained_text(template, messages: list[dict], loss_on: str) -> str:
    """The text the loss covers, whose UTF-8 bytes bits per byte are counted in: the assistant's
    contents, or the whole rendered conversation with ``loss_on: all``."""
    if loss_on == "all":
        return template.render(messages)
    return "".join(m["content"] for m in messages if m["role"] == "assistant")
