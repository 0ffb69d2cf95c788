"""Bad input, as a table: each row is something a user could plausibly give, and the one line
they get back. Every row goes through the real CLI and must exit 2 with that line on stderr,
no traceback, and nothing written or overwritten.

To add a case, add a row: an id, the state the run is in before the command (``none``,
``tokenized``, ``sharded`` or ``trained``), an optional setup that breaks something, the command
line ({cfg}, {run} and {tmp} are filled in), and the message expected on stderr.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from conftest import TINY_TRAIN, write_config
from lmtrain.cli import app
from lmtrain.rundir import fork_run


@dataclass
class Case:
    id: str
    state: str
    args: str
    expected: str
    setup: Callable[[Path, Path], None] | None = None  # (tmp, run_dir) -> None
    env: dict = field(default_factory=dict)


def cfg_text(text):
    return lambda tmp, run: (tmp / "config.yaml").write_text(text)


def cfg_bytes(raw):
    return lambda tmp, run: (tmp / "config.yaml").write_bytes(raw)


def write(path_in_tmp, content):
    def setup(tmp, run):
        path = tmp / path_in_tmp
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return setup


def truncate(rel, keep=1000):
    def setup(tmp, run):
        path = run / rel
        path.write_bytes(path.read_bytes()[:keep])
    return setup


def patch_bytes(rel, offset, raw):
    def setup(tmp, run):
        blob = bytearray((run / rel).read_bytes())
        blob[offset:offset + len(raw)] = raw
        (run / rel).write_bytes(bytes(blob))
    return setup


def edit_manifest(edit):
    def setup(tmp, run):
        path = run / "data" / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))
    return setup


def other_tokenizer(tmp, run):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(run / "tokenizer" / "tokenizer.json"))
    tok.add_tokens(["an_extra_token"])
    tok.save(str(run / "tokenizer" / "tokenizer.json"))


def parquet_without_text(tmp, run):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp / "d.parquet")


def reformat_tokenizer(tmp, run):
    # The same tokenizer, written out differently: another sha256 than the checkpoint recorded.
    path = run / "tokenizer" / "tokenizer.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=1))


def edit_state(edit):
    def setup(tmp, run):
        path = run / LATEST / "state.json"
        state = json.loads(path.read_text())
        edit(state)
        path.write_text(json.dumps(state))
    return setup


def out_of_vocabulary_val_token(tmp, run):
    blob = bytearray((run / "data" / "val-00000.bin").read_bytes())
    blob[256 + 40:256 + 42] = (65000).to_bytes(2, "little")  # header and size intact, the id is not
    (run / "data" / "val-00000.bin").write_bytes(bytes(blob))


def no_complete_checkpoint(tmp, run):
    (run / "checkpoints" / "latest").unlink()
    for model in (run / "checkpoints").glob("step-*/model.safetensors"):
        model.unlink()


def llama_source(name="src", **changes):
    """A Hugging Face llama directory (config, a stand-in weights file, the run's tokenizer) whose
    config.json has ``changes``: resolving reads no weights, so the refusals come first."""
    def setup(tmp, run):
        src = tmp / name
        src.mkdir()
        fields = {"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 128,
                  "num_hidden_layers": 2, "num_attention_heads": 2, "rms_norm_eps": 1e-6,
                  "max_position_embeddings": 32, "eos_token_id": 0, **changes}
        (src / "config.json").write_text(json.dumps(fields))
        (src / "model.safetensors").write_bytes(b"x")
        shutil.copyfile(run / "tokenizer" / "tokenizer.json", src / "tokenizer.json")
    return setup


def raw_source(text: str):
    def setup(tmp, run):
        (tmp / "src").mkdir()
        (tmp / "src" / "config.json").write_text(text)
    return setup


def symlink(rel, target_in_tmp):
    def setup(tmp, run):
        (tmp / target_in_tmp).write_text("someone else's file")
        (run / rel).unlink(missing_ok=True)
        (run / rel).symlink_to(tmp / target_in_tmp)
    return setup


def gguf_of(arch: str):
    def setup(tmp, run):
        import gguf
        import numpy as np

        writer = gguf.GGUFWriter(str(tmp / "m.gguf"), arch)
        writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return setup


DEEP = "[" * 100_000 + "]" * 100_000


LATEST = "checkpoints/step-00000004"
T = "tokenize --config {cfg}"
TRAIN = "train --config {cfg}"
CHAT = "tokenize --config {cfg} --set data.format=chat"
GOOD_CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n"

CASES = [
    # -- the config file and --set ------------------------------------------------------------
    Case("yaml-malformed", "none", T, "invalid YAML in", cfg_text("run:\n  name: [oops\n")),
    Case("yaml-list", "none", T, "must be a mapping of sections", cfg_text("- run\n- data\n")),
    Case("yaml-empty", "none", T, "is empty", cfg_text("")),
    Case("yaml-not-utf8", "none", T, "is not UTF-8", cfg_bytes(b"run:\n  name: caf\xe9\n")),
    Case("yaml-python-tag", "none", T, "tags that construct Python objects are not allowed",
         cfg_text("run: !!python/object/apply:os.system ['echo pwned']\n")),
    Case("unknown-section", "none", T, "unknown section 'tokeniser'; did you mean tokenizer?",
         cfg_text("tokeniser:\n  vocab_size: 300\n")),
    Case("unknown-key", "none", T, "unknown key model.n_layers; did you mean model.n_layer?",
         cfg_text("model:\n  n_layers: 3\n")),
    Case("wrong-type", "none", T, "model.n_layer: expected an integer, got a string 'four'",
         cfg_text("model:\n  n_layer: four\n")),
    Case("negative-size", "none", T + " --set model.n_layer=-1", "model.n_layer: must be >= 1, got -1"),
    Case("zero-batch", "none", T + " --set train.batch_size=0", "train.batch_size: must be >= 1, got 0"),
    Case("lr-out-of-range", "none", T + " --set train.lr=3", "train.lr: must be > 0.0 and <= 1.0, got 3"),
    Case("lr-negative", "none", T + " --set train.lr=-0.001", "train.lr: must be > 0.0"),
    Case("set-without-equals", "none", T + " --set train.lr", "expected section.key=value"),
    Case("set-unknown-key", "none", T + " --set train.lrr=0.1", "unknown key train.lrr; did you mean train.lr?"),
    Case("set-bad-value", "none", T + " --set train.max_steps=lots", "train.max_steps: expected an integer"),
    Case("set-bad-choice", "none", T + " --set model.norm=batchnorm", "model.norm: must be one of"),
    Case("config-missing", "none", "tokenize --config {tmp}/missing.yaml", "config file not found"),
    Case("heads-do-not-divide", "none", T + " --set model.n_head=5", "must be divisible by model.n_head (5)"),
    Case("rope-odd-head", "none", T + " --set model.n_embd=36 --set model.n_head=4 --set model.pos_embedding=rope",
         "rope needs an even head size"),
    Case("min-lr-above-lr", "none", T + " --set train.min_lr=0.1 --set train.lr=0.01", "must not exceed train.lr"),
    Case("cuda-graphs-with-accumulation", "none", T + " --set train.compile_mode=reduce-overhead --set train.grad_accum=4",
         "needs train.grad_accum 1"),
    Case("no-val-split", "none", T + " --set data.val_fraction=0", "must be > 0 unless data.val_source"),
    Case("vocab-too-small", "none", T + " --set tokenizer.vocab_size=200", "must be at least 257"),
    # -- the run directory ----------------------------------------------------------------------
    Case("run-dir-is-a-file", "none", T + " --set run.dir={tmp}/afile", "is a file, not a directory",
         write("afile", "x")),
    Case("run-dir-not-writable", "none", T + " --set run.dir=/proc/lmtrain-run", "is not writable"),
    # -- the corpus ---------------------------------------------------------------------------
    Case("source-missing", "none", T + " --set data.source={tmp}/nothing.txt", "no such file or directory"),
    Case("source-empty", "none", T + " --set data.source={tmp}/blank", "no non-empty documents",
         write("blank/a.txt", "   \n\n")),
    Case("glob-no-match", "none", T + " --set data.source={tmp}/*.jsonl", "matches no files"),
    Case("binary-file", "none", T + " --set data.source={tmp}/blob.txt", "blob.txt: not valid UTF-8",
         write("blob.txt", bytes(range(256)) * 4)),
    Case("unsupported-extension", "none", T + " --set data.source={tmp}/x.docx", "unsupported extension",
         write("x.docx", "x")),
    Case("jsonl-bad-line", "none", T + " --set data.source={tmp}/d.jsonl", "d.jsonl: line 3 is not valid JSON",
         write("d.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": c}\n')),
    Case("jsonl-missing-field", "none", T + " --set data.source={tmp}/d.jsonl", "no field 'text' (it has: 'body', 'id')",
         write("d.jsonl", '{"body": "a", "id": 1}\n')),
    Case("parquet-missing-column", "none", T + " --set data.source={tmp}/d.parquet", "no field 'text' (it has: 'body')",
         parquet_without_text),
    Case("unknown-builtin", "none", T + " --set data.source=builtin:wikipedia", "unknown builtin corpus 'wikipedia'"),
    Case("hf-malformed", "none", T + " --set data.source=hf:a/b/c", "expected hf:owner/name"),
    # -- the tokenizer ------------------------------------------------------------------------
    Case("tokenizer-missing", "none", "shard --config {cfg}", "run `lmtrain tokenize` first"),
    Case("tokenizer-corrupt", "tokenized", "shard --config {cfg}", "is not a valid tokenizer",
         write("run/tokenizer/tokenizer.json", "{not json")),
    Case("tokenizer-exists", "tokenized", T, "already exists; the run's shards and checkpoints depend on it"),
    Case("tokenizer-from-another-run", "sharded", TRAIN, "were made with another tokenizer", other_tokenizer),
    # -- the shards ---------------------------------------------------------------------------
    Case("shards-missing", "tokenized", TRAIN, "run `lmtrain shard` first"),
    Case("shard-truncated", "sharded", TRAIN, "truncated", truncate("data/train-00000.bin")),
    Case("shard-wrong-magic", "sharded", TRAIN, "wrong magic", patch_bytes("data/val-00000.bin", 0, b"GARBAGE!")),
    Case("manifest-missing", "sharded", TRAIN, "no manifest.json",
         lambda tmp, run: (run / "data" / "manifest.json").unlink()),
    Case("manifest-edited", "sharded", TRAIN, "header tokens is 8192 but the manifest says 8000",
         edit_manifest(lambda m: m["shards"][0].update(tokens=8000))),
    Case("manifest-path-escape", "sharded", TRAIN, "refusing shard name",
         edit_manifest(lambda m: m["shards"][0].update(file="../../../etc/passwd"))),
    Case("verify-finds-changed-bytes", "sharded", "shard --config {cfg} --verify", "sha256",
         patch_bytes("data/val-00000.bin", 400, b"\x01\x02")),
    Case("block-larger-than-val", "sharded", TRAIN + " --set model.block_size=60000", "has no window of 60001 tokens"),
    # -- checkpoints --------------------------------------------------------------------------
    Case("no-checkpoint", "sharded", "sample --run {run}", "train first",
         lambda tmp, run: (run / "config.yaml").write_text((tmp / "config.yaml").read_text())),
    Case("safetensors-truncated", "trained", TRAIN + " --set train.max_steps=8", "not a readable safetensors file",
         truncate(LATEST + "/model.safetensors", 100)),
    Case("optimizer-missing", "trained", TRAIN + " --set train.max_steps=8", "optimizer.pt is missing",
         lambda tmp, run: (run / LATEST / "optimizer.pt").unlink()),
    Case("state-corrupt", "trained", TRAIN + " --set train.max_steps=8", "state.json is not valid JSON",
         write("run/" + LATEST + "/state.json", "{")),
    Case("shape-mismatch", "trained", TRAIN + " --set train.max_steps=8 --set model.n_embd=64",
         "model.n_embd: checkpoint 32, config 64"),
    Case("latest-points-outside", "trained", TRAIN + " --set train.max_steps=8", "not a checkpoint directory name",
         write("run/checkpoints/latest", "../../../etc\n")),
    Case("weights-are-a-pickle", "trained", "sample --run {run}", "not a readable safetensors file",
         write("run/" + LATEST + "/model.safetensors", b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00.")),
    Case("out-of-memory", "sharded", TRAIN + " --set model.n_embd=65536 --set model.n_head=1",
         "of memory per process has: lower train.batch_size"),  # refused before it starts (lmtrain.memory)
    Case("no-cuda", "sharded", TRAIN + " --set train.device=cuda", "torch sees no CUDA device"),
    Case("state-without-rng", "trained", TRAIN + " --set train.max_steps=8", "unreadable rng state",
         edit_state(lambda s: s.pop("rng"))),
    Case("state-step-not-a-number", "trained", TRAIN + " --set train.max_steps=8",
         "step or model_config has the wrong type", edit_state(lambda s: s.update(step="four"))),
    Case("state-negative-tokens", "trained", TRAIN + " --set train.max_steps=8", "tokens_seen is -5",
         edit_state(lambda s: s.update(tokens_seen=-5))),
    Case("latest-gone-nothing-complete", "trained", TRAIN + " --set train.max_steps=8",
         "none of the checkpoints", no_complete_checkpoint),
    Case("eval-token-out-of-vocabulary", "trained", "eval --run {run}", "outside the vocabulary of 300",
         out_of_vocabulary_val_token),
    # -- artifacts that no longer agree with the config ---------------------------------------
    Case("train-on-another-source", "sharded", TRAIN + " --set data.source={tmp}/other.txt",
         "the run's tokenizer was trained with data.source=", write("other.txt", "other text\n" * 50)),
    Case("shard-another-source", "sharded", "shard --config {cfg} --set data.source={tmp}/other.txt",
         "the run's tokenizer was trained with data.source=", write("other.txt", "other text\n" * 50)),
    Case("train-with-another-vocab", "sharded", TRAIN + " --set tokenizer.vocab_size=600",
         "trained with tokenizer.vocab_size=300, the config now says 600"),
    Case("train-on-shards-of-another-config", "sharded", TRAIN + " --set shard.shard_tokens=4096",
         "were built with shard_tokens 8192, the config says 4096"),
    Case("resume-on-other-data", "trained", TRAIN + " --set train.max_steps=8 --set data.max_documents=100",
         "the run's tokenizer was trained with data.max_documents=None"),
    Case("sample-after-tokenizer-replaced", "trained", "sample --run {run}", "was trained with another tokenizer",
         reformat_tokenizer),
    Case("eval-after-tokenizer-replaced", "trained", "eval --run {run}", "was trained with another tokenizer",
         reformat_tokenizer),
    Case("yaml-duplicate-key", "none", T, "duplicate key 'lr'", cfg_text("train:\n  lr: 0.001\n  lr: 0.003\n")),
    Case("set-integer-not-whole", "none", T + " --set train.batch_size=1.5e0", "train.batch_size: expected an integer"),
    Case("fp16-on-cpu", "sharded", TRAIN + " --set train.device=cpu --set train.precision=fp16", "fp16 needs a GPU"),
    Case("world-size-does-not-divide", "sharded", TRAIN, "cannot be split evenly over 3 processes",
         env={"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "3"}),
    # -- sample and eval ----------------------------------------------------------------------
    Case("top-p-zero", "trained", "sample --run {run} --top-p 0", "--top-p must be in (0, 1]"),
    Case("top-p-above-one", "trained", "sample --run {run} --top-p 1.5", "--top-p must be in (0, 1]"),
    Case("negative-temperature", "trained", "sample --run {run} --temperature -0.5", "--temperature must be >= 0"),
    Case("zero-samples", "trained", "sample --run {run} --num-samples 0", "--num-samples must be >= 1"),
    Case("zero-new-tokens", "trained", "sample --run {run} -n 0", "--max-new-tokens must be >= 1"),
    Case("sample-no-cuda", "trained", "sample --run {run} --device cuda", "--device: cuda was asked for"),
    Case("eval-no-cuda", "trained", "eval --run {run} --device cuda", "--device: cuda was asked for"),
    Case("sample-bad-device", "trained", "sample --run {run} --device tpu", "--device: must be auto, cpu, cuda"),
    Case("unknown-checkpoint", "trained", "sample --run {run} --checkpoint final", "unknown checkpoint 'final'"),
    Case("checkpoint-path-escape", "trained", "sample --run {run} --checkpoint ../../etc", "unknown checkpoint"),
    Case("prompt-file-missing", "trained", "sample --run {run} --prompt-file {tmp}/nope.txt", "cannot read --prompt-file"),
    Case("prompt-too-long", "trained", "sample --run {run} --prompt-file {tmp}/long.txt",
         "with learned positions it must be shorter", write("long.txt", "x = 1\n" * 100)),
    Case("run-dir-missing", "none", "sample --run {tmp}/no-such-run", "no run directory"),
    Case("export-no-run", "none", "export --run {tmp}/nope --format hf --out {tmp}/out", "no run directory"),
    Case("export-unknown-format", "trained", "export --run {run} --format onnx --out {tmp}/out",
         "--format must be one of hf, gguf"),
    Case("export-out-exists", "trained", "export --run {run} --format gguf --out {tmp}/taken.gguf",
         "already exists; --force replaces it", write("taken.gguf", "mine")),
    Case("export-bad-dtype", "trained", "export --run {run} --format hf --out {tmp}/out --dtype int8",
         "--dtype must be one of fp32, bf16, fp16"),
    Case("lora-without-init-from", "sharded", TRAIN + " --set train.lora_rank=4", "needs model.init_from"),
    Case("lora-unknown-target", "sharded", TRAIN + " --set train.lora_rank=4 --set train.lora_targets=[q,query]",
         "train.lora_targets: unknown projection 'query'"),
    Case("lora-with-muon", "trained", TRAIN + " --set train.lora_rank=4 --set model.init_from={run} --set "
         "train.optimizer=muon", "LoRA's adapters train with adamw"),
    Case("lora-on-a-whole-model-checkpoint", "trained", TRAIN + " --set train.lora_rank=4 --set model.init_from={run}",
         "it holds the whole model's weights, and the config trains LoRA adapters"),
    Case("export-peft-of-a-whole-model", "trained", "export --run {run} --format peft --out {tmp}/adapter",
         "holds a whole model (train.lora_rank 0), not LoRA adapters"),
    Case("init-from-hub-name", "sharded", TRAIN + " --set model.init_from=gpt2", "lmtrain downloads nothing"),
    Case("init-from-not-a-model", "sharded", TRAIN + " --set model.init_from={tmp}", "neither a Hugging Face directory"),
    Case("init-from-corrupt-config", "sharded", TRAIN + " --set model.init_from={tmp}/src",
         "config.json is not readable JSON", write("src/config.json", "{oops")),
    Case("eval-data-missing", "trained", "eval --run {run} --data {tmp}/nope.txt", "no such file or directory"),
    # -- multiple-choice task files -------------------------------------------------------------
    Case("tasks-missing", "trained", "eval --run {run} --tasks {tmp}/nope.jsonl", "nope.jsonl: no such task file"),
    Case("tasks-not-json", "trained", "eval --run {run} --tasks {tmp}/t.jsonl", "t.jsonl:2: not JSON",
         write("t.jsonl", '{"context": "a", "choices": ["b", "c"], "label": 0}\n{oops\n')),
    Case("tasks-one-choice", "trained", "eval --run {run} --tasks {tmp}/t.jsonl",
         "t.jsonl:1: 1 choice; an item needs at least two", write("t.jsonl", '{"context": "a", "choices": ["b"], "label": 0}\n')),
    Case("tasks-label-out-of-range", "trained", "eval --run {run} --tasks {tmp}/t.jsonl",
         "t.jsonl:3: label 4 is out of range for 4 choices",
         write("t.jsonl", '{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 1}\n\n'
                          '{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}\n')),
    Case("tasks-no-label", "trained", "eval --run {run} --tasks {tmp}/t.jsonl",
         "t.jsonl:1: label must be the index of the right choice, got ''",
         write("t.jsonl", '{"ctx": "a", "endings": ["b", "c"], "label": ""}\n')),  # HellaSwag's test split
    Case("tasks-empty", "trained", "eval --run {run} --tasks {tmp}/t.jsonl", "t.jsonl: no items", write("t.jsonl", "\n")),
    Case("tasks-unknown-format", "trained", "eval --run {run} --tasks {tmp}/t.jsonl",
         "t.jsonl:1: no choices; expected HellaSwag's ctx/endings/label or context/choices/label",
         write("t.jsonl", '{"question": "a", "answer": "b"}\n')),
    Case("tasks-not-utf8", "trained", "eval --run {run} --tasks {tmp}/t.jsonl", "t.jsonl:1: not UTF-8 text",
         write("t.jsonl", b'{"context": "\xff", "choices": ["a", "b"], "label": 0}\n')),
    Case("tasks-choice-longer-than-block", "trained", "eval --run {run} --tasks {tmp}/t.jsonl",
         "t.jsonl:1: choice 1 is", write("t.jsonl", '{"context": "a", "choices": ["b", "%s"], "label": 0}\n' % ("x = 1; " * 30))),
    Case("tasks-with-data", "trained", "eval --run {run} --tasks {tmp}/t.jsonl --data {tmp}/t.txt",
         "--data, --max-tokens and --gguf are for bits per byte"),
    Case("tasks-limit-without-tasks", "trained", "eval --run {run} --limit 5", "--limit counts task items"),
    Case("train-eval-tasks-missing", "sharded", TRAIN + " --set train.eval_tasks={tmp}/nope.jsonl",
         "train.eval_tasks: ", ),
    # -- Reliability III: crafted sources, task files and paths; the eleven tracebacks ------------
    Case("init-from-json-nested-deep", "sharded", TRAIN + " --set model.init_from={tmp}/src",
         "config.json is not readable JSON (nested too deeply)", raw_source(DEEP)),
    Case("state-json-nested-deep", "trained", TRAIN + " --set train.max_steps=8",
         "state.json is not valid JSON (nested too deeply)", write("run/" + LATEST + "/state.json", DEEP)),
    Case("tasks-json-nested-deep", "trained", "eval --run {run} --tasks {tmp}/t.jsonl",
         "t.jsonl:1: not JSON lmtrain reads (nested too deeply)", write("t.jsonl", DEEP + "\n")),
    Case("init-from-zero-heads", "sharded", TRAIN + " --set model.init_from={tmp}/src",
         "config.json's num_attention_heads is 0, expected at least 1", llama_source(num_attention_heads=0)),
    Case("tasks-label-superscript", "trained", "eval --run {run} --tasks {tmp}/t.jsonl",
         "t.jsonl:1: label must be the index of the right choice, got '²'",
         write("t.jsonl", '{"context": "a", "choices": ["b", "c"], "label": "\u00b2"}\n')),
    Case("tasks-lone-surrogate", "trained", "eval --run {run} --tasks {tmp}/t.jsonl",
         "t.jsonl:1: choice 1 is not valid text (it holds a lone surrogate)",
         write("t.jsonl", '{"context": "a", "choices": ["b", "\\ud800"], "label": 0}\n')),
    Case("init-from-extra-special-token", "trained",
         T + " --set run.dir={tmp}/fresh --set model.init_from={run} --set tokenizer.special_tokens=[<|endoftext|>,<|im_start|>]",
         "'<|im_start|>' is not a token of model.init_from"),
    Case("plan-minutes-inf", "none", "plan --minutes inf --config {cfg}", "--minutes must be a number of minutes"),
    Case("plan-out-onto-a-folder", "none", "plan --minutes 1 --config {cfg} --out {tmp}", "is a folder; the plan is one YAML file"),
    Case("plan-out-in-a-missing-folder", "none", "plan --minutes 1 --config {cfg} --out {tmp}/nope/plan.yaml",
         "nope does not exist"),
    Case("export-out-dot-force", "trained", "export --run {run} --format hf --out . --force",
         "has no readable lmtrain-export.json"),
    # -- what --force may replace, and what a writer may take ---------------------------------------
    Case("export-force-over-the-run", "trained", "export --run {run} --format hf --out {run} --force",
         "is a run directory"),
    Case("export-force-into-checkpoints", "trained", "export --run {run} --format hf --out {run}/checkpoints --force",
         "inside the run's own checkpoints"),
    Case("export-force-onto-a-pointer", "trained", "export --run {run} --format gguf --out {run}/checkpoints/latest --force",
         "inside the run's own checkpoints"),
    Case("export-force-over-a-users-folder", "trained", "export --run {run} --format hf --out {tmp}/folder --force",
         "has no readable lmtrain-export.json", write("folder/thesis.tex", "three years of work")),
    Case("run-name-escapes-runs", "none", T + " --set run.dir=null --set run.name=../../elsewhere",
         "run.name: '../../elsewhere' must be a plain name"),
    Case("run-dir-is-root", "none", T + " --set run.dir=/", "is the root directory"),
    Case("run-dir-is-home", "none", T + " --set run.dir=~/", "is your home directory"),
    Case("run-dir-holds-a-users-files", "none", T + " --set run.dir={tmp}/folder", "holds other files (thesis.tex)",
         write("folder/thesis.tex", "three years of work")),
    Case("train-log-is-a-link", "trained", TRAIN + " --set train.max_steps=8", "train.log is a symbolic link",
         symlink("train.log", "elsewhere.txt")),
    Case("pointer-is-a-link", "trained", "sample --run {run} --checkpoint latest", "latest is a symbolic link", symlink("checkpoints/latest", "p.txt")),
    Case("pointer-holds-a-whole-file", "trained", "sample --run {run} --checkpoint latest", "names '" + "x" * 39 + "...",
         write("run/checkpoints/latest", "x" * 300_000)),
    Case("lora-without-init-from-before-any-stage", "none", T + " --set train.lora_rank=4", "needs model.init_from"),
    Case("lora-with-muon-before-any-stage", "none", "run --config {cfg} --set train.lora_rank=4 --set model.init_from={tmp} "
         "--set train.optimizer=muon", "LoRA's adapters train with adamw"),
    Case("source-only-run-directories", "trained", T + " --set run.dir={tmp}/fresh --set data.source={run}",
         "are inside lmtrain run directories"),
    Case("init-from-vocab-below-tokenizer", "sharded", TRAIN + " --set model.init_from={tmp}/src",
         "config.json's vocab_size 10 is smaller than its tokenizer (300 tokens)", llama_source(vocab_size=10)),
    Case("init-from-nan", "sharded", TRAIN + " --set model.init_from={tmp}/src",
         "config.json's rms_norm_eps is nan, expected a positive finite number", llama_source(rms_norm_eps=float("nan"))),
    Case("init-from-fractional-width", "sharded", TRAIN + " --set model.init_from={tmp}/src",
         "config.json's hidden_size is 64.7, expected a whole number", llama_source(hidden_size=64.7)),
    # -- found by our own adversarial round --------------------------------------------------------
    Case("init-from-eos-id-huge", "sharded", TRAIN + " --set model.init_from={tmp}/src",
         "names no end-of-text token (eos_token_id) in its tokenizer", llama_source(eos_token_id=10**30)),
    Case("init-from-vocab-huge", "sharded", TRAIN + " --set model.init_from={tmp}/src",
         "its configuration gives tokenizer.vocab_size: must be", llama_source(vocab_size=10**12)),
    Case("prompt-file-without-end", "trained", "sample --run {run} --prompt-file /dev/zero",
         "the prompt is longer than 16 MB"),
    # -- real models: what lmtrain would only approximate --------------------------------------------
    Case("init-from-unsupported-architecture", "sharded", TRAIN + " --set model.init_from={tmp}/src",
         "model_type 'gemma' is not supported", llama_source(model_type="gemma")),
    Case("init-from-unsupported-rope-scaling", "sharded", TRAIN + " --set model.init_from={tmp}/src",
         "rope scaling of type 'yarn'", llama_source(rope_scaling={"rope_type": "yarn", "factor": 4.0})),
    Case("init-from-short-sliding-window", "sharded", TRAIN + " --set model.init_from={tmp}/src",
         "a sliding window of 16 tokens, shorter than the context of 32",
         llama_source(model_type="mistral", sliding_window=16)),
    Case("init-from-pickled-weights-only", "sharded", TRAIN + " --set model.init_from={tmp}/src",
         "only safetensors weights are read; pytorch_model.bin is a pickle",
         lambda tmp, run: (llama_source()(tmp, run), (tmp / "src" / "model.safetensors").rename(tmp / "src" / "pytorch_model.bin"))),
    Case("init-from-sentencepiece-model-only", "sharded", TRAIN + " --set model.init_from={tmp}/src",
         "only a SentencePiece tokenizer.model", lambda tmp, run: (llama_source()(tmp, run),
         (tmp / "src" / "tokenizer.json").rename(tmp / "src" / "tokenizer.model"))),
    Case("init-from-contradicted", "sharded", TRAIN + " --set model.init_from={tmp}/src --set model.n_head=4",
         "model.n_head: the config says 4, the source has 2", llama_source()),
    Case("init-from-gguf-of-another-architecture", "sharded", TRAIN + " --set model.init_from={tmp}/m.gguf",
         "a GGUF of architecture 'gemma'; lmtrain reads llama, qwen2, qwen3 and gpt2", gguf_of("gemma")),
    Case("init-from-gguf-not-gguf", "sharded", TRAIN + " --set model.init_from={tmp}/m.gguf",
         "not a readable GGUF file", write("m.gguf", b"GGUF but not really")),
    Case("init-from-index-escapes", "sharded", TRAIN + " --set model.init_from={tmp}/src",
         "names '../secret.safetensors', not a file of the source directory",
         lambda tmp, run: (llama_source()(tmp, run), (tmp / "src" / "model.safetensors.index.json").write_text(
             json.dumps({"weight_map": {"a": "../secret.safetensors"}})))),
    # -- conversations ---------------------------------------------------------------------------------
    Case("chat-unknown-role", "none", CHAT + " --set data.source={tmp}/chat.jsonl",
         "chat.jsonl:2: messages[1]: unknown role 'robot'", write("chat.jsonl", GOOD_CHAT + json.dumps(
             {"messages": [{"role": "robot", "content": "x"}]}) + "\n")),
    Case("chat-empty-assistant", "none", CHAT + " --set data.source={tmp}/chat.jsonl",
         "chat.jsonl:2: the conversation has no assistant message with content", write("chat.jsonl", GOOD_CHAT + json.dumps(
             {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}) + "\n")),
    Case("chat-not-a-list", "none", CHAT + " --set data.source={tmp}/chat.jsonl",
         "chat.jsonl:2: 'messages' must be a list", write("chat.jsonl", GOOD_CHAT + '{"messages": "hi"}\n')),
    Case("chat-not-json", "none", CHAT + " --set data.source={tmp}/chat.jsonl",
         "chat.jsonl:2: not valid JSON", write("chat.jsonl", GOOD_CHAT + '{"messages": [\n')),
    Case("chat-from-text-files", "none", CHAT, "data.format chat reads conversation records from"),
    Case("chat-from-the-builtin-corpus", "none", CHAT + " --set data.source=builtin:pystdlib",
         "a text corpus; data.format chat needs conversation records"),
    Case("chat-source-without-template", "sharded", CHAT + " --force --set data.source={tmp}/chat.jsonl --set model.init_from={tmp}/src",
         "the model ships no chat template", lambda tmp, run: (llama_source()(tmp, run),
                                                               write("chat.jsonl", GOOD_CHAT)(tmp, run))),
    Case("chat-with-a-text-run", "trained", "chat --run {run}", "has no chat template: it was trained on text"),
    Case("chat-bad-loss-on", "none", CHAT + " --set train.loss_on=assistants",
         "train.loss_on"),
]


@pytest.fixture(scope="module")
def templates(tmp_path_factory, prepared_run):
    """Run directories in each state, built once; every case works on a copy."""
    from lmtrain.config import load_config
    from lmtrain.train import train

    source_run, corpus = prepared_run
    root = tmp_path_factory.mktemp("states")
    (root / "none").mkdir()
    tokenized = root / "tokenized" / "run"
    shutil.copytree(source_run / "tokenizer", tokenized / "tokenizer")
    sharded = root / "sharded" / "run"
    fork_run(source_run, sharded)
    trained = root / "trained" / "run"
    fork_run(source_run, trained)
    config = write_config(root / "trained.yaml", trained, corpus, **TINY_TRAIN)
    train(load_config(config, ["train.max_steps=4", "data.val_fraction=0.15", "shard.shard_tokens=8192"]))
    return root, corpus


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, templates, monkeypatch):
    root, corpus = templates
    run_dir = tmp_path / "run"
    if case.state != "none":
        shutil.copytree(root / case.state / "run", run_dir)
    cfg = write_config(tmp_path / "config.yaml", run_dir, corpus, **TINY_TRAIN)
    import yaml

    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["val_fraction"] = 0.15
    raw["shard"] = {"shard_tokens": 8192}
    cfg.write_text(yaml.safe_dump(raw))
    if case.setup is not None:
        case.setup(tmp_path, run_dir)
    before = snapshot(tmp_path)
    args = case.args.format(cfg=cfg, run=run_dir, tmp=tmp_path).split()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args, env=case.env)
    assert isinstance(result.exception, SystemExit), f"crashed: {result.exception!r}\n{result.output}"
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert case.expected in errors[0], errors[0]
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before, "the failed command wrote or changed files"


def test_the_table_is_large_enough():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
