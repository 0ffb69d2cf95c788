"""Conversation data without training: chat templates rendered exactly as transformers renders
them, the assistant-only loss mask, record shapes and bad records, version-2 shards, packing that
never lets one conversation see another, and the masked losses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmtrain.chat_template import CHATML, ChatTemplate, end_of_turn_token
from lmtrain.config import load_config
from lmtrain.conversations import BadRecord, encode, to_messages
from lmtrain.errors import DataError, LmtrainError

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]

# Templates written for these tests in the style of the families people fine-tune.
CHATML_QWEN = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
PLAIN_EOS = (  # no turn tokens of its own: the end-of-sequence token closes the assistant's turn
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
TEMPLATES = {"lmtrain-chatml": CHATML, "qwen-style": CHATML_QWEN, "llama3-style": LLAMA3, "plain-eos": PLAIN_EOS}
SPECIAL_NAMES = (("bos_token", "<|begin_of_text|>"), ("eos_token", "<|endoftext|>"))

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "6, of course."}],
    [{"role": "user", "content": "Grüße, 東京 🚀"}, {"role": "assistant", "content": "Ça va — ünïcödé ✓"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}, {"role": "assistant", "content": "x"}],
    [{"role": "user", "content": "  spaced  "}, {"role": "assistant", "content": " lead and trail \n"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello there, how are you? the answer is four and six"] * 20, trainer=trainer)
    return tok


def hf_tokenizer(tokenizer, template: str):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|endoftext|>")
    hf.chat_template = template
    return hf


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_rendering_equals_transformers_apply_chat_template(name, tokenizer):
    template = ChatTemplate(TEMPLATES[name], SPECIAL_NAMES)
    hf = hf_tokenizer(tokenizer, TEMPLATES[name])
    for conversation in CONVERSATIONS:
        for generation_prompt in (False, True):
            messages = conversation[:-1] if generation_prompt else conversation
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            assert template.render(messages, add_generation_prompt=generation_prompt) == want


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_mask_covers_exactly_the_assistant_contents_and_their_end_of_turn(name, tokenizer):
    template = ChatTemplate(TEMPLATES[name], SPECIAL_NAMES)
    specials = frozenset(SPECIALS)
    turn_end = end_of_turn_token(template, specials)
    assert turn_end == {"lmtrain-chatml": "<|im_end|>", "qwen-style": "<|im_end|>", "llama3-style": "<|eot_id|>",
                        "plain-eos": "<|endoftext|>"}[name]
    hf = hf_tokenizer(tokenizer, TEMPLATES[name])
    for conversation in CONVERSATIONS:
        ids, mask = encode(tokenizer, template, conversation, specials, "assistant")
        # the ids are transformers' own tokenization of its own rendering
        assert ids.tolist() == hf.apply_chat_template(conversation, tokenize=True, return_dict=False)
        trained = tokenizer.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
        contents = [m["content"].strip() if name == "llama3-style" else m["content"]
                    for m in conversation if m["role"] == "assistant"]
        assert trained == "".join(c + turn_end for c in contents)
        _, everything = encode(tokenizer, template, conversation, specials, "all")
        assert everything.all()


def test_record_shapes_become_the_same_messages():
    want = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert to_messages({"messages": want}) == want
    assert to_messages({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}) == want
    assert to_messages({"prompt": "Q", "completion": "A"}) == want
    assert to_messages({"instruction": "Q", "output": "A"}) == want
    assert to_messages({"instruction": "Q", "input": "ctx", "output": "A"})[0]["content"] == "Q\n\nctx"
    system = to_messages({"messages": [{"role": "system", "content": "S"}, *want]})
    assert system[0] == {"role": "system", "content": "S"}


@pytest.mark.parametrize("record, says", [
    ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "y"}, {"role": "assistant", "content": ""}]}, "assistant message is empty"),
    ({"messages": "hello"}, "must be a list"),
    ({"messages": [{"role": "user", "content": 3}]}, "must be a string"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "must start with a user message"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": None}]}, "must be a string"),
    ({"text": "plain"}, "no conversation in the record"),
    ([1, 2], "must be a JSON object"),
])
def test_a_bad_record_says_why(record, says):
    with pytest.raises(BadRecord, match=says):
        to_messages(record)


def write_chat(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def good(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def chat_config(tmp_path, source, *extra):
    return load_config(None, [f"run.dir={tmp_path / 'run'}", f"data.source={source}", "data.format=chat",
                              "tokenizer.vocab_size=300", "data.val_fraction=0.2", "model.block_size=32", *extra])


def test_a_bad_record_is_one_line_naming_file_and_line_or_is_counted_with_skip(tmp_path):
    from lmtrain.prepare import build_shards, train_tokenizer

    source = write_chat(tmp_path / "chat.jsonl", [good(i) for i in range(40)] + [{"messages": [
        {"role": "robot", "content": "beep"}]}] + [good(i) for i in range(40, 60)])
    with pytest.raises(DataError, match=rf"chat.jsonl:41: .*unknown role 'robot'"):
        train_tokenizer(chat_config(tmp_path, source))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    cfg = chat_config(tmp_path, source, "data.bad_records=skip")
    train_tokenizer(cfg)
    result = build_shards(cfg)
    splits = result.manifest.splits
    assert splits["train"].skipped_records + splits["val"].skipped_records == 1
    assert splits["train"].documents + splits["val"].documents == 60


def test_chat_shards_hold_the_mask_verify_and_old_text_shards_read_as_all_trained(tmp_path, prepared_run):
    from lmtrain.config import Config
    from lmtrain.packing import Conversations, build_row
    from lmtrain.prepare import build_shards, train_tokenizer
    from lmtrain.shards import FORMAT_VERSION, open_masks, read_manifest, shard_fingerprint, verify_shards
    from lmtrain.tokenizer import load_tokenizer

    source = write_chat(tmp_path / "chat.jsonl", [good(i) for i in range(60)])
    cfg = chat_config(tmp_path, source)
    train_tokenizer(cfg)
    manifest = build_shards(cfg).manifest
    data = tmp_path / "run" / "data"
    assert manifest.format_version == 2 and verify_shards(data).shards == 2
    tokenizer = load_tokenizer(tmp_path / "run")
    conversations = Conversations(data, "train", 33)
    assert len(conversations) == manifest.splits["train"].documents
    ids, flags = conversations.read(0)
    trained = [int(t) for t, f in zip(ids, flags) if f & 1]
    assert tokenizer.decode(trained, skip_special_tokens=False).startswith("answer ")
    assert tokenizer.decode(trained, skip_special_tokens=False).endswith("<|im_end|>")
    assert manifest.splits["train"].trained_tokens == sum(int((conversations.read(i)[1] & 1).sum())
                                                          for i in range(len(conversations)))
    row = build_row(conversations, np.array([0, 1]))
    assert (row.targets != -100).sum() == sum(int((conversations.read(i)[1][1:] & 1).sum()) for i in (0, 1))
    # text shards: version 1, no mask, and their fingerprint does not name the chat-only keys
    run, _ = prepared_run
    assert read_manifest(run / "data").format_version == FORMAT_VERSION
    assert open_masks(run / "data", "train") is None
    assert "format" not in shard_fingerprint(Config(), "0" * 64)["data"]
    # a flipped mask byte is caught by --verify
    shard = data / manifest.shards[0].file
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(LmtrainError, match="sha256"):
        verify_shards(data)


def tiny_model(rope: bool = True):
    from lmtrain.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=32,
                         pos_embedding="rope" if rope else "learned")).eval()


@pytest.mark.parametrize("rope", [True, False])
def test_packed_conversations_never_see_each_other_and_score_as_unpacked(rope):
    from lmtrain.packing import PackedLayout

    model = tiny_model(rope)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 50, (12,), generator=g), torch.randint(0, 50, (9,), generator=g)
    row = torch.cat([a, b, torch.zeros(4, dtype=torch.long)])[None]
    positions = torch.cat([torch.arange(12), torch.arange(9), torch.zeros(4, dtype=torch.long)])[None]
    segments = torch.cat([torch.zeros(12), torch.ones(9), torch.full((4,), -1)]).long()[None]
    packed, _ = model(row, layout=PackedLayout(positions, segments))
    alone_a, _ = model(a[None])
    alone_b, _ = model(b[None])
    torch.testing.assert_close(packed[0, :12], alone_a[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[0, 12:21], alone_b[0], atol=1e-5, rtol=0)
    # changing the first conversation changes nothing in the second
    other = row.clone()
    other[0, :12] = (other[0, :12] + 7) % 50
    changed, _ = model(other, layout=PackedLayout(positions, segments))
    torch.testing.assert_close(changed[0, 12:21], packed[0, 12:21], atol=1e-6, rtol=0)


def test_every_loss_skips_ignored_targets_as_cross_entropy_does():
    from lmtrain.distill import distillation_loss
    from lmtrain.loss import chunked_cross_entropy, chunked_eval_loss

    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (40,), generator=g)
    targets[::3] = -100
    want = torch.nn.functional.cross_entropy(h @ w.t(), targets)
    want.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = chunked_cross_entropy(h, w, targets, 50)
    got.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(h.grad, grads[0])
    torch.testing.assert_close(w.grad, grads[1])
    torch.testing.assert_close(chunked_eval_loss(h, w, targets, 50), want.detach())
    student, teacher = (h @ w.t()).detach(), torch.randn(40, 50, generator=g)
    keep = targets != -100
    mixed = distillation_loss(student, teacher, targets, 0.5, 2.0)
    only_kept = distillation_loss(student[keep], teacher[keep], targets[keep], 0.5, 2.0)
    torch.testing.assert_close(mixed, only_kept)


def test_a_mixture_weights_its_sources_per_epoch_and_tiles_long_text(tmp_path):
    from lmtrain.data import RunData
    from lmtrain.prepare import build_shards, train_tokenizer
    from lmtrain.shards import read_manifest

    chat = write_chat(tmp_path / "chat.jsonl", [good(i) for i in range(80)])
    prose = tmp_path / "prose.txt"
    prose.write_text("\n\n".join(" ".join(f"word{(i * 7 + j) % 50}" for j in range(10 + 30 * (i % 4)))
                                 for i in range(40)), encoding="utf-8")
    mixture = "data.mixture=[{source: %s, weight: 2}, {source: %s, weight: 0.5, format: text}]" % (chat, prose)
    cfg = chat_config(tmp_path, "unused", mixture, "data.sample_by=paragraph")
    train_tokenizer(cfg)
    build_shards(cfg)
    data = RunData.open(cfg)
    train = data.train
    chats, texts = int((train.part == 0).sum()), int((train.part == 1).sum())
    assert 50 < chats <= 80 and read_manifest(tmp_path / "run" / "data").splits["train"].documents < chats + 40
    assert texts > 0 and train.length.max() <= 33  # long text documents tiled into windows, not cut
    batches = data.train_batches(7, 4, 0, 1, torch.device("cpu"))
    for epoch in (0, 1):
        order = train.epoch_order(7, epoch)
        assert (train.part[order] == 0).sum() == 2 * chats
        assert (train.part[order] == 1).sum() == round(0.5 * texts)
        assert np.array_equal(order, train.epoch_order(7, epoch))  # reproducible
    assert not np.array_equal(train.epoch_order(7, 0), train.epoch_order(7, 1))  # reshuffled
    x, y, _ = batches.get(0, 0)
    assert x.shape == (4, 32) and (y != -100).any()
    # the weights change the batches, not the shards
    from lmtrain.shards import shard_fingerprint

    other = chat_config(tmp_path, "unused", mixture.replace("weight: 2", "weight: 3"), "data.sample_by=paragraph")
    assert shard_fingerprint(cfg, "0" * 64) == shard_fingerprint(other, "0" * 64)


def test_chat_records_are_read_from_json_arrays_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmtrain.config import DataConfig
    from lmtrain.corpus import iter_documents

    records = [good(i) for i in range(5)] + [{"prompt": "p", "completion": "c"}]
    (tmp_path / "a.json").write_text(json.dumps(records[:3]), encoding="utf-8")
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}), tmp_path / "b.parquet")
    data = DataConfig(source=str(tmp_path), format="chat")
    docs = list(iter_documents(str(tmp_path), data))
    assert [d.messages[-1]["content"] for d in docs] == ["answer 0", "answer 1", "answer 2", "c1", "c2"]
    assert docs[3].origin.endswith("b.parquet record 1")
