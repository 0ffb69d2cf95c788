"""Chat templates: rendering a conversation to text exactly as transformers does, and finding
which characters of that text are the assistant's.

A model's chat template is a Jinja template shipped in its tokenizer files (``chat_template.jinja``
or ``tokenizer_config.json``'s ``chat_template``). transformers renders it in a sandboxed Jinja
environment with a fixed set of globals; ``render`` builds the same environment (trim_blocks,
lstrip_blocks, loop controls, its ``tojson``, ``raise_exception``, ``strftime_now``, a restricted
``namespace``) so that the text lmtrain trains on is the text the model will be prompted with.

A run that trains its own tokenizer gets ``CHATML``, with ``<|im_start|>`` and ``<|im_end|>`` as
special tokens (added at tokenize time).

Which tokens the loss covers is decided on characters, before tokenizing: ``assistant_spans``
renders the conversation once per assistant turn and reads off where that turn's content starts
and ends, and the end-of-turn token the template writes right after it. Templates render a
conversation's prefix as a prefix of the whole (the property generation relies on too), so
positions found in the short renderings hold in the long one; a template for which that does not
hold is refused with a clear error rather than trained on a guessed mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmtrain.errors import DataError, TokenizerError, first_line
from lmtrain.fsutil import read_json

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TOKENS = (IM_START, IM_END)
# lmtrain's own template (ChatML, as Qwen and SmolLM2 use it): no system prompt unless given.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("system", "user", "assistant")
MAX_TEMPLATE_BYTES = 1 << 20


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' own filter: Jinja's escapes HTML characters, which would change the text.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateNamespace(jinja2.utils.Namespace):
        # As in transformers: no underscore names, so a template cannot reach Python internals.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers): rendered as
        # their body. lmtrain finds the assistant's text itself, so templates with or without them agree.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = dict
    env.globals["namespace"] = TemplateNamespace
    return env


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2

    try:
        return _environment().from_string(template)
    except jinja2.exceptions.TemplateError as exc:
        raise TokenizerError(f"the chat template is not valid Jinja ({first_line(exc, 120)})") from None


@dataclass(frozen=True)
class ChatTemplate:
    """A template and the special tokens it may name (``bos_token``, ``eos_token``, ...)."""

    source: str
    special: tuple[tuple[str, str], ...] = ()  # (name, token) pairs passed to the template

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return _compile(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                tools=None, documents=None, **dict(self.special))
        except jinja2.exceptions.TemplateError as exc:
            raise DataError(f"the chat template refused the conversation: {first_line(exc, 160)}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise DataError(f"the chat template failed on the conversation ({type(exc).__name__}: "
                            f"{first_line(exc, 120)})") from None

    def assistant_spans(self, messages: list[dict], specials: frozenset[str]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans the loss covers: each assistant
        message's content and the end-of-turn token (one of ``specials``) written right after it."""
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[:i + 1])
            if not upto.startswith(before) or not full.startswith(upto):
                raise DataError("the chat template does not render a conversation's beginning as the beginning "
                                "of the whole; lmtrain cannot tell which tokens are the assistant's "
                                "(train.loss_on: all trains on every token)")
            turn = upto[len(before):]
            content = message["content"]
            at = turn.find(content) if content else -1
            if at < 0 and content.strip():
                content = content.strip()  # templates that trim the content (Llama 3's)
                at = turn.find(content)
            if at < 0:
                raise DataError("the chat template does not write an assistant message's content as it is; "
                                "lmtrain cannot tell which tokens are the assistant's (train.loss_on: all "
                                "trains on every token)")
            start = len(before) + at
            end = start + len(content)
            spans.append((start, end + _end_of_turn_length(full[end:len(upto)], specials)))
        return full, spans


def _end_of_turn_length(after: str, specials: frozenset[str]) -> int:
    """Characters from the end of an assistant's content through the special token closing its
    turn (whitespace before it included), or 0 when the template writes none."""
    stripped = after.lstrip(" ")
    for token in sorted(specials, key=len, reverse=True):
        if token and stripped.startswith(token):
            return len(after) - len(stripped) + len(token)
    return 0


def end_of_turn_token(template: ChatTemplate, specials: frozenset[str]) -> str | None:
    """The special token the template closes an assistant turn with (``<|im_end|>``, ``<|eot_id|>``,
    ``</s>``...): what generation stops at."""
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    try:
        full, spans = template.assistant_spans(probe, specials)
    except DataError:
        return None
    start, end = spans[0]
    tail = full[start + len("y"):end].lstrip(" ")  # what follows the probe's one-letter reply
    return tail if tail in specials else None


# --------------------------------------------------------------------------------------------
# Where a run's template comes from
# --------------------------------------------------------------------------------------------


def read_template(directory: Path) -> str | None:
    """The chat template shipped in a tokenizer directory, or None: ``chat_template.jinja`` first
    (newer transformers write it), then ``tokenizer_config.json``'s ``chat_template`` (a string, or
    a list of named templates of which ``default`` is the one ``apply_chat_template`` uses)."""
    jinja = directory / TEMPLATE_FILE
    if jinja.is_file():
        if jinja.stat().st_size > MAX_TEMPLATE_BYTES:
            raise TokenizerError(f"{jinja}: over {MAX_TEMPLATE_BYTES >> 20} MB, not a chat template")
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{jinja}: cannot read it ({first_line(exc, 80)})") from None
    config = _tokenizer_config(directory)
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _tokenizer_config(directory: Path) -> dict:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        raw = read_json(path, 16 << 20)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{path} is not readable JSON ({first_line(exc, 80)})") from None
    return raw if isinstance(raw, dict) else {}


def special_token_strings(directory: Path) -> tuple[tuple[str, str], ...]:
    """``bos_token``, ``eos_token``, ``pad_token`` and ``unk_token`` as tokenizer_config.json names
    them (a string or ``{"content": ...}``): what transformers hands the template."""
    config = _tokenizer_config(directory)
    found = []
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            found.append((name, value))
    return tuple(found)


def load_template(directory: Path, eot_token: str | None = None) -> ChatTemplate:
    """The template of the tokenizer in ``directory``, with its special tokens; lmtrain's ChatML
    when it ships none (a tokenizer lmtrain trained for chat data)."""
    source = read_template(directory)
    special = special_token_strings(directory)
    if source is None:
        source = CHATML
        if eot_token is not None and not any(name == "eos_token" for name, _ in special):
            special = special + (("eos_token", eot_token),)
    return ChatTemplate(source, special)


def special_tokens_of(tokenizer: Any) -> frozenset[str]:
    """The tokenizer's special added tokens (what can close a turn)."""
    return frozenset(token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special)


def end_of_turn_id(directory: Path, tokenizer: Any, eot_text: str) -> int | None:
    """The id of the token the chat template in ``directory`` closes an assistant turn with, when
    there is a template and that token is not the end-of-text one: what exports add to their stop ids."""
    if read_template(directory) is None:
        return None
    token = end_of_turn_token(load_template(directory, eot_text), special_tokens_of(tokenizer))
    found = tokenizer.token_to_id(token) if token is not None and token != eot_text else None
    return found
