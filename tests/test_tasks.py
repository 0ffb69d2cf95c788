"""Multiple-choice tasks: scores equal a plain forward pass per choice, for both file formats and
every metric; a model trained on the right continuations picks them; the CLI's table and JSON;
task scores during training; bad task files are one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from lmtrain.config import load_config
from lmtrain.inference import load_model
from lmtrain.rundir import fork_run
from lmtrain.tasks import encode_task, read_task, score_items, score_task, split_continuation
from lmtrain.train import train

# Written for these tests (not from any dataset): code-flavoured, like the test corpus.
GENERIC = [
    {"context": "def add(a, b):\n    return", "choices": ["a + b", "None", "print(a)", "a - b"], "label": 0},
    {"query": "class Point:\n    def __init__(self):\n        self.x =", "choices": ["None", "0", "self"], "label": 0},
    {"context": "", "choices": ["def f(x):", "return 1"], "label": 0},  # empty context: end-of-text leads
    {"context": "import os\n", "choices": ["import sys", "return os"], "label": 1},  # trailing newline moves
    {"context": "value = 7", "choices": ["é ü ñ", "x", "  spaced  "], "label": 2},  # bytes ≠ characters
    {"context": "x = " + " + ".join(f"v{i}" for i in range(40)), "choices": ["+ v40", "- 1"], "label": 0},
]
HELLASWAG = [
    {"ind": 1, "activity_label": "Coding", "ctx_a": "A function", "ctx_b": "returns", "ctx": "A function returns",
     "endings": ["a value.", "nothing at all.", "the sum of its arguments.", "an error."], "label": 2,
     "split": "val", "split_type": "indomain", "source_id": "test"},
    {"ind": 2, "activity_label": "Coding", "ctx_a": "", "ctx_b": "", "ctx": "The loop ends when",
     "endings": ["the counter reaches ten.", "it starts.", "i = 0", "x"], "label": "0"},
]


PYTHON_MC = Path(__file__).parent / "data" / "python_mc.jsonl"


def cli(*args: str) -> str:
    """The real CLI, in-process (as tests/test_bad_input.py drives it): its stdout."""
    from typer.testing import CliRunner

    from lmtrain.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory, prepared_run):
    """Two trained tiny runs: learned positions + LayerNorm, and RoPE + RMSNorm + SwiGLU."""

    from conftest import TINY_TRAIN, write_config

    source_run, corpus = prepared_run
    runs = {}
    for name, model in {"gpt2": {}, "llama": {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu"}}.items():
        root = tmp_path_factory.mktemp(name)
        run_dir = root / "run"
        fork_run(source_run, run_dir)
        sections = {k: dict(v) for k, v in TINY_TRAIN.items()}
        sections["model"].update(model)
        sections["shard"] = {"shard_tokens": 8192}
        config = write_config(root / "config.yaml", run_dir, corpus, **sections)
        raw = load_config(config, ["train.max_steps=10", "data.val_fraction=0.15"])
        train(raw)
        runs[name] = run_dir
    return runs


def reference_loglikelihood(loaded, context: str, choice: str) -> tuple[float, int]:
    """The harness' computation, spelled out: one plain forward pass over context + continuation,
    cut from the left to block_size + 1 tokens, summing the continuation's log-probabilities."""
    tok, block = loaded.tokenizer, loaded.model.config.block_size
    ctx, cont = split_continuation(context, choice)
    if ctx:
        ctx_ids = tok.encode(ctx, add_special_tokens=False).ids
        cont_ids = tok.encode(ctx + cont, add_special_tokens=False).ids[len(ctx_ids):]
    else:
        ctx_ids, cont_ids = [loaded.eot_id], tok.encode(cont, add_special_tokens=False).ids
    window = (ctx_ids + cont_ids)[-(block + 1):]
    reference_loglikelihood.truncated |= len(ctx_ids) + len(cont_ids) > block + 1
    x = torch.tensor([window[:-1]])
    with torch.no_grad():
        logits, _ = loaded.model(x)
    log_probs = F.log_softmax(logits[0].double(), dim=-1)
    positions = torch.arange(len(window) - 1 - len(cont_ids), len(window) - 1)
    return log_probs[positions, torch.tensor(cont_ids)].sum().item(), len(cont_ids)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("fmt", ["generic", "hellaswag"])
def test_scores_equal_a_plain_forward_pass_per_choice(trained_models, tmp_path, arch, fmt):
    loaded = load_model(trained_models[arch])
    rows = GENERIC if fmt == "generic" else HELLASWAG
    task = read_task(write_jsonl(tmp_path / f"{fmt}.jsonl", rows))
    encoded = encode_task(task, loaded.tokenizer, loaded.eot_id, loaded.model.config.block_size)
    scores = score_items(loaded.model, encoded.items, loaded.device, None, batch_size=3)
    expected = {"acc": [], "acc_norm": [], "acc_norm_tokens": []}
    truncated = 0
    for item, score in zip(task.items, scores):
        reference_loglikelihood.truncated = False
        refs = [reference_loglikelihood(loaded, item.context, c) for c in item.choices]
        truncated += reference_loglikelihood.truncated
        lls = np.array([ll for ll, _ in refs])
        assert score.loglikelihoods == pytest.approx(lls.tolist(), abs=1e-4)
        assert score.tokens == [n for _, n in refs]
        n_bytes = np.array([len(c.encode("utf-8")) for c in item.choices])
        expected["acc"].append(lls.argmax() == item.label)
        expected["acc_norm"].append((lls / n_bytes).argmax() == item.label)
        expected["acc_norm_tokens"].append((lls / np.array([n for _, n in refs])).argmax() == item.label)
    result = score_task(loaded.model, encoded, loaded.device, None, batch_size=2)
    n = len(rows)
    assert result.items == n
    assert result.chance == pytest.approx(np.mean([1 / len(i.choices) for i in task.items]))
    for metric, hits in expected.items():
        rate = float(np.mean(hits))
        assert getattr(result, metric) == pytest.approx(rate)
        assert getattr(result, f"{metric}_stderr") == pytest.approx(math.sqrt(rate * (1 - rate) / (n - 1)))
    assert result.truncated == truncated
    if fmt == "generic":
        assert truncated >= 1  # the 40-term context does not fit 32 tokens
        assert task.items[1].context.startswith("class Point")  # "query" is read as the context


@pytest.mark.slow
def test_packing_shares_the_context_once_per_item(trained_models, tmp_path):
    loaded = load_model(trained_models["gpt2"])
    task = read_task(write_jsonl(tmp_path / "t.jsonl", GENERIC[:2]))
    encoded = encode_task(task, loaded.tokenizer, loaded.eot_id, 256)  # all fit
    for item in encoded.items:
        assert len(item.rows) == 1  # one sequence holds the context and every choice
        assert len(item.rows[0].continuations) == len(item.tokens)


@pytest.mark.slow
def test_a_model_trained_on_the_answers_picks_them(tmp_path):
    """Trained on text where each context is followed by its right continuation, the model scores
    far above chance on the task built from those contexts; and the run logs the task scores to
    train.log and TensorBoard at each evaluation."""
    import random

    rng = random.Random(0)
    animals = ["cat", "dog", "fox", "owl", "bee", "cow", "hen", "elk"]
    sounds = ["meows", "barks", "yips", "hoots", "buzzes", "moos", "clucks", "bugles"]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(60):
        lines = [f"the {a} {s} at night." for a, s in zip(animals, sounds)]
        rng.shuffle(lines)
        (corpus / f"doc{d}.txt").write_text("\n".join(lines) + "\n")
    items = [{"context": f"the {a}", "choices": [f"{s} at night." for s in sounds], "label": i}
             for i, a in enumerate(animals)]
    task_file = write_jsonl(tmp_path / "animals.jsonl", items)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({
        "run": {"dir": str(tmp_path / "run"), "seed": 3},
        "data": {"source": str(corpus), "val_fraction": 0.1},
        "tokenizer": {"vocab_size": 300},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 48, "block_size": 64},
        "train": {"batch_size": 8, "max_steps": 150, "warmup_steps": 10, "lr": 3e-3, "min_lr": 3e-4,
                  "eval_every": 75, "eval_batches": 1, "checkpoint_every": 150, "log_every": 50,
                  "eval_tasks": [str(task_file)]},
        "sample": {"max_new_tokens": 4},
    }))
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 0, result.stderr
    out = cli("eval", "--run", str(tmp_path / "run"), "--tasks", str(task_file), "--json")
    scores = json.loads(out)["tasks"]["animals"]
    assert scores["items"] == 8 and scores["chance"] == pytest.approx(1 / 8)
    assert scores["acc"] >= 0.75 and scores["acc_norm"] >= 0.75 and scores["acc_norm_tokens"] >= 0.75
    log = (tmp_path / "run" / "train.log").read_text()
    assert "step 150: task animals: acc" in log and "step 75: task animals: acc" in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    for tag in ("tasks/animals/acc", "tasks/animals/acc_norm", "tasks/animals/acc_norm_tokens"):
        assert [e.step for e in events.Scalars(tag)] == [75, 150]
    assert events.Scalars("tasks/animals/acc")[-1].value == pytest.approx(scores["acc"])


@pytest.mark.slow
def test_eval_tasks_prints_a_table_and_json_with_limit(trained_models, tmp_path):
    run_dir = trained_models["gpt2"]
    a = write_jsonl(tmp_path / "code_mc.jsonl", GENERIC)
    b = PYTHON_MC  # the shipped task file the README reports the default model's scores on
    lines = cli("eval", "--run", str(run_dir), "--tasks", f"{a}, {b}").splitlines()
    assert lines[0] == "checkpoint step-00000010 (step 10)"
    assert lines[1].split() == ["task", "items", "acc", "acc_norm", "acc_norm_tokens", "chance", "truncated"]
    assert lines[2].split()[:2] == ["code_mc", "6"] and lines[3].split()[:2] == ["python_mc", "40"]
    assert lines[3].split()[-2] == "0.2500"  # chance: four choices each
    assert "±" in lines[2]
    data = json.loads(cli("eval", "--run", str(run_dir), "--tasks", str(a), "--limit", "2", "--json"))
    assert set(data) == {"checkpoint", "step", "tasks"}
    row = data["tasks"]["code_mc"]
    assert row["items"] == 2 and row["chance"] == pytest.approx((1 / 4 + 1 / 3) / 2)
    assert set(row) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "acc_norm_tokens",
                        "acc_norm_tokens_stderr", "chance", "truncated", "path"}


@pytest.mark.slow
def test_the_harness_agrees_item_by_item(trained_models, tmp_path):
    """EleutherAI's lm-evaluation-harness, run on the transformers export with a local task over
    the same items, picks the same choice as lmtrain for every item (acc, and acc_norm against its
    acc_bytes), with log-likelihoods equal to float precision. RoPE + RMSNorm + SwiGLU exports as
    Llama, the shape whose export permutes weights; contexts are cut to fit, one is empty."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    generic = write_jsonl(tmp_path / "code_mc.jsonl", GENERIC)
    hellaswag = write_jsonl(tmp_path / "hs.jsonl", [{**r, "label": int(r["label"])} for r in HELLASWAG])
    import subprocess
    import sys

    from conftest import REPO

    result = subprocess.run([sys.executable, str(REPO / "scripts" / "check_harness.py"), "--run",
                             str(trained_models["llama"]), "--tasks", f"{generic},{hellaswag}"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["code_mc"]["acc_agree"] == len(GENERIC) and report["hs"]["acc_agree"] == len(HELLASWAG)
    for task in report.values():
        assert task["acc"] == task["harness_acc"] and task["acc_norm"] == task["harness_acc_bytes"]
        assert task["max_abs_loglikelihood_diff"] < 1e-4


@pytest.mark.slow
def test_an_item_with_thousands_of_choices_is_cut_into_rows_the_model_holds(trained_models, tmp_path):
    """Reliability III: one item of 10,000 short choices was packed into a single ~49,000-position
    row (a T x T mask of 9.5 GB). Every row now holds at most block_size inputs, and the scores
    are the plain forward pass's all the same."""
    loaded = load_model(trained_models["gpt2"])
    block = loaded.model.config.block_size
    many = {"context": "for item in range(10):", "choices": [f" x{i}" for i in range(10_000)], "label": 3}
    encoded = encode_task(read_task(write_jsonl(tmp_path / "many.jsonl", [many])), loaded.tokenizer, loaded.eot_id,
                          block)
    rows = encoded.items[0].rows
    assert max(row.length for row in rows) <= block and len(rows) > 100
    assert sorted(c for row in rows for c in row.choices) == list(range(10_000))
    few = dict(many, choices=many["choices"][:40])
    task = read_task(write_jsonl(tmp_path / "few.jsonl", [few]))
    encoded = encode_task(task, loaded.tokenizer, loaded.eot_id, block)
    assert len(encoded.items[0].rows) > 1  # 40 choices do not fit one row of 32
    score = score_items(loaded.model, encoded.items, loaded.device, None, batch_size=3)[0]
    refs = [reference_loglikelihood(loaded, few["context"], c)[0] for c in few["choices"]]
    assert score.loglikelihoods == pytest.approx(refs, abs=1e-4)
