"""From conversations to an assistant: a tiny model fine-tuned on a chat task it cannot do before
answers held-out prompts through `lmtrain chat`; chat runs resume bit-exactly (full and LoRA) and
under DDP train as one process does; `lmtrain eval` on chat data equals transformers on the export;
a chat session's cached turns equal a full recomputation."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from conftest import run_cli, write_config
from lmtrain.config import load_config
from lmtrain.rundir import fork_run
from lmtrain.train import train

WORDS = ["apple", "river", "stone", "cloud", "green", "table", "light", "music", "horse", "paper", "dream",
         "train", "smile", "ocean", "tiger", "plant"]
SWAP_MODEL = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64, "pos_embedding": "rope",
              "norm": "rmsnorm", "mlp": "swiglu"}
SWAP_TRAIN = {"max_steps": 300, "batch_size": 16, "eval_every": 100, "warmup_steps": 15, "lr": 3e-3,
              "optimizer": "adamw", "checkpoint_every": 100, "log_every": 10}


def swap_task(directory):
    """'swap A B' -> 'B A' over pairs of 16 words; 20 pairs are never trained on (held out)."""
    rng = random.Random(0)
    pairs = list(itertools.permutations(WORDS, 2))
    rng.shuffle(pairs)
    held, trained = pairs[:20], pairs[20:]
    records = []
    for i, (a, b) in enumerate(trained * 2):
        messages = [{"role": "user", "content": f"swap {a} {b}"}, {"role": "assistant", "content": f"{b} {a}"}]
        if i % 4 == 0:
            messages.insert(0, {"role": "system", "content": "You swap two words."})
        records.append({"messages": messages} if i % 3 else
                       {"conversations": [{"from": "human" if m["role"] == "user" else
                                           ("gpt" if m["role"] == "assistant" else "system"), "value": m["content"]}
                                          for m in messages]})
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "swap.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return source, held


@pytest.fixture(scope="module")
def swap_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    source, held = swap_task(root / "data")
    config = write_config(root / "config.yaml", root / "run", source, data={"format": "chat", "val_fraction": 0.05},
                          model=SWAP_MODEL, train=SWAP_TRAIN)
    result = run_cli("run", "--config", str(config), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return config, root / "run", held


@pytest.mark.slow
def test_a_fine_tuned_model_answers_held_out_prompts_in_lmtrain_chat(swap_run):
    _, run_dir, held = swap_run
    before = "\n".join(f"swap {a} {b}\n/reset" for a, b in held) + "\n"
    result = run_cli("chat", "--run", str(run_dir), "--greedy", "-n", "24", input=before)
    assert result.returncode == 0, result.stderr[-2000:]
    replies = result.stdout.splitlines()
    assert len(replies) == len(held)  # one line per message, nothing else on stdout
    right = sum(reply == f"{b} {a}" for reply, (a, b) in zip(replies, held))
    assert right >= 18, list(zip(replies, held))
    assert "tokens/s" in result.stderr


@pytest.mark.slow
def test_eval_on_chat_data_equals_transformers_on_the_export(swap_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmtrain.evaluate import evaluate
    from lmtrain.packing import Conversations

    _, run_dir, _ = swap_run
    result = run_cli("export", "--run", str(run_dir), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr[-2000:]
    ours = evaluate(run_dir)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    split = Conversations(run_dir / "data", "val", SWAP_MODEL["block_size"] + 1)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(split)):
            ids, flags = split.read(i)
            labels = np.where(flags & 1, ids, -100)  # transformers shifts the labels itself
            labels[0] = -100
            out = model(torch.tensor(ids)[None], labels=torch.tensor(labels)[None])
            n = int((labels[1:] != -100).sum())
            total += float(out.loss) * n
            count += n
    assert ours.tokens == count
    assert abs(ours.loss - total / count) < 1e-5
    template = (run_dir / "tokenizer" / "chat_template.jinja").read_text()
    assert (tmp_path / "hf" / "chat_template.jinja").read_text() == template
    # transformers, on the export, renders the template and generates the reply lmtrain chat gives
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "swap apple river"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    chat = run_cli("chat", "--run", str(run_dir), "--greedy", "-n", "24", input="swap apple river\n")
    assert reply == chat.stdout.splitlines()[0]
    result = run_cli("export", "--run", str(run_dir), "--format", "gguf", "--out", str(tmp_path / "m.gguf"))
    assert result.returncode == 0, result.stderr[-2000:]
    import gguf

    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["tokenizer.chat_template"].contents() == template
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == im_end


def chat_fork(swap_run, tmp_path, name, *sets, fork=True):
    config, run_dir, _ = swap_run
    target = tmp_path / name
    if fork:
        fork_run(run_dir, target)
    return load_config(config, [f"run.dir={target}", "train.max_steps=12", "train.checkpoint_every=6",
                                "train.eval_every=6", "train.log_every=1", *sets])


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_chat_run_resumes_bit_exactly_after_sigterm(swap_run, tmp_path, monkeypatch, lora):
    from test_train import interrupted_at, losses, weights

    _, run_dir, _ = swap_run
    sets = [f"model.init_from={run_dir}", "train.lora_rank=4"] if lora else ["model.dropout=0.1"]
    straight = train(chat_fork(swap_run, tmp_path, "straight", *sets))
    first = interrupted_at(6, chat_fork(swap_run, tmp_path, "resumed", *sets), monkeypatch)
    second = train(chat_fork(swap_run, tmp_path, "resumed", *sets, fork=False))
    assert second.resumed_from == "step-00000006"
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {**losses(first), **losses(second)} == losses(straight)


@pytest.mark.slow
def test_chat_under_ddp_trains_as_one_process(swap_run, tmp_path):
    from test_distributed import step_losses, torchrun

    config, run_dir, _ = swap_run
    sets = ["train.max_steps=4", "train.checkpoint_every=4", "train.eval_every=4", "train.batch_size=4"]
    fork_run(run_dir, tmp_path / "ddp")
    result = torchrun(config, f"run.dir={tmp_path / 'ddp'}", *sets, "train.grad_accum=1")
    assert result.returncode == 0, result.stderr[-3000:]
    fork_run(run_dir, tmp_path / "single")
    single = train(load_config(config, [f"run.dir={tmp_path / 'single'}", *sets, "train.grad_accum=2"]))
    ddp = step_losses((tmp_path / "ddp" / "train.log").read_text())
    for step, loss in ddp.items():
        assert abs(loss - {h["step"]: h["loss"] for h in single.history if "loss" in h}[step]) < 1e-4


@pytest.mark.slow
def test_packed_and_padded_rows_give_the_same_val_loss(swap_run):
    from lmtrain.evaluate import conversation_val_loss
    from lmtrain.inference import load_model
    from lmtrain.packing import Conversations, val_rows

    _, run_dir, _ = swap_run
    loaded = load_model(run_dir)
    split = Conversations(run_dir / "data", "val", SWAP_MODEL["block_size"] + 1)
    losses = {packing: conversation_val_loss(loaded.model, split, val_rows(split, 10_000, packing), 4, packing,
                                             loaded.device, None) for packing in ("pack", "pad")}
    assert abs(losses["pack"] - losses["pad"]) < 1e-5


@pytest.mark.slow
def test_a_later_turn_reuses_the_cache_and_computes_what_a_full_pass_does(swap_run):
    from lmtrain.chat import ChatModel, ChatSession
    from lmtrain.generate import SamplingParams
    from lmtrain.inference import load_model

    _, run_dir, _ = swap_run
    model = ChatModel.of(load_model(run_dir))
    session = ChatSession(model, SamplingParams(temperature=0.0), max_new_tokens=8, system="You swap two words.")
    first = session.say("swap apple river")
    second = session.say("swap green tiger")
    assert second.prefilled < len(model.prompt_ids(session.messages[:-1]))  # only the new turn was computed
    ids = model.prompt_ids(session.messages[:-1])
    with torch.no_grad():
        full, _ = model.loaded.model(torch.tensor([ids]))
    fresh = ChatSession(model, SamplingParams(temperature=0.0), max_new_tokens=8)
    fresh.messages = session.messages[:-2]
    replay = fresh.say("swap green tiger")
    assert replay.text == second.text and first.text
    assert int(full[0, -1].argmax()) == model.loaded.tokenizer.encode(second.text, add_special_tokens=False).ids[0]


@pytest.mark.slow
def test_a_conversation_that_outgrows_the_context_drops_its_oldest_turns_and_keeps_the_system_prompt(swap_run):
    from lmtrain.chat import ChatModel, ChatSession
    from lmtrain.generate import SamplingParams
    from lmtrain.inference import load_model

    _, run_dir, _ = swap_run
    model = ChatModel.of(load_model(run_dir))
    session = ChatSession(model, SamplingParams(temperature=0.0), max_new_tokens=8, system="You swap two words.")
    dropped = 0
    for a, b in itertools.islice(itertools.permutations(WORDS, 2), 12):
        reply = session.say(f"swap {a} {b}")
        dropped += reply.dropped
        assert len(model.prompt_ids(session.messages)) <= model.context
    assert dropped > 0
    assert session.messages[0] == {"role": "system", "content": "You swap two words."}
    assert session.messages[1]["role"] == "user" and session.messages[-1]["role"] == "assistant"
