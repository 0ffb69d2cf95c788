#!/usr/bin/env python
"""Check `lmtrain eval --tasks` against EleutherAI's lm-evaluation-harness, item by item.

    pip install lm-eval                    # in the dev extra; needs accelerate (in the hf extra)
    python scripts/check_harness.py --run runs/default --tasks hellaswag_val.jsonl [--limit 500]

Exports the checkpoint with `lmtrain export --format hf` into a temporary directory, writes each
task file there in one form (context, choices, label) with a local task YAML over it
(`dataset_path: json`, `output_type: multiple_choice`), runs the harness on the export
(`--model hf`, fp32, CPU, offline), and scores the same items with lmtrain. Compares, per item,
every choice's log-likelihood (max absolute difference) and the choice each rule picks: acc, and
lmtrain's acc_norm against the harness' acc_bytes (both per UTF-8 byte). The harness' own acc_norm
divides by characters; it is printed beside them.

Prints a table and one JSON line; exits 1 if any item's acc or acc_norm choice differs.
"""

from __future__ import annotations

import os

# The harness and datasets read these when they are imported: nothing may be fetched.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from lmtrain.errors import LmtrainError  # noqa: E402
from lmtrain.export import export  # noqa: E402
from lmtrain.inference import load_model  # noqa: E402
from lmtrain.tasks import Task, encode_task, read_tasks, score_items  # noqa: E402

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_bytes, aggregation: mean, higher_is_better: true}}
"""


def harness_loglikelihoods(export_dir: Path, tasks: list[Task], workdir: Path) -> dict[str, dict]:
    """Per task: each item's choice log-likelihoods from the harness, and its aggregate metrics."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = {}
    for task in tasks:
        name = f"lmtrain_check_{task.name}"
        names[name] = task.name
        data = workdir / f"{task.name}.jsonl"
        data.write_text("".join(json.dumps({"context": i.context, "choices": list(i.choices), "label": i.label}) + "\n"
                                for i in task.items), encoding="utf-8")
        (workdir / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data), encoding="utf-8")
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={export_dir},dtype=float32", tasks=list(names), device="cpu",
        batch_size=1, log_samples=True, task_manager=TaskManager(include_path=str(workdir)))
    out = {}
    for name, ours in names.items():
        samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
        out[ours] = {"loglikelihoods": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
                     "metrics": {k.split(",")[0]: v for k, v in results["results"][name].items()
                                 if k.split(",")[0] in ("acc", "acc_norm", "acc_bytes")}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--tasks", required=True, help="task files, comma-separated")
    parser.add_argument("--checkpoint", default="latest")
    parser.add_argument("--limit", type=int, default=None, help="the first N items of each file")
    args = parser.parse_args()
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    try:
        tasks = read_tasks([f for f in args.tasks.split(",") if f], args.limit)
        with tempfile.TemporaryDirectory(prefix="lmtrain-harness-") as tmp:
            workdir = Path(tmp)
            export(args.run, "hf", workdir / "export", args.checkpoint)
            theirs = harness_loglikelihoods(workdir / "export", tasks, workdir)
    except LmtrainError as exc:
        sys.exit(f"error: {exc}")
    loaded = load_model(args.run, args.checkpoint, "cpu")
    report, failed = {}, False
    header = f"{'task':<16} {'items':>6} {'acc (lmtrain/harness)':>22} {'acc_norm / acc_bytes':>21} " \
             f"{'harness acc_norm':>16} {'acc agree':>10} {'norm agree':>10} {'max |Δll|':>10}"
    print(header)
    for task in tasks:
        encoded = encode_task(task, loaded.tokenizer, loaded.eot_id, loaded.model.config.block_size)
        ours = score_items(loaded.model, encoded.items, loaded.device, None, batch_size=16)
        harness = theirs[task.name]
        agree = {"acc": 0, "acc_norm": 0}
        worst = 0.0
        for score, lls in zip(ours, harness["loglikelihoods"]):
            lls = np.asarray(lls)
            worst = max(worst, float(np.abs(np.asarray(score.loglikelihoods) - lls).max()))
            picked = score.predictions()
            agree["acc"] += picked["acc"] == int(lls.argmax())
            agree["acc_norm"] += picked["acc_norm"] == int((lls / np.asarray(score.utf8_bytes)).argmax())
        n = len(ours)
        acc = float(np.mean([s.predictions()["acc"] == s.label for s in ours]))
        acc_norm = float(np.mean([s.predictions()["acc_norm"] == s.label for s in ours]))
        m = harness["metrics"]
        failed |= agree["acc"] != n or agree["acc_norm"] != n
        report[task.name] = {"items": n, "acc": acc, "harness_acc": m.get("acc"), "acc_norm": acc_norm,
                             "harness_acc_bytes": m.get("acc_bytes"), "harness_acc_norm": m.get("acc_norm"),
                             "acc_agree": agree["acc"], "acc_norm_agree": agree["acc_norm"],
                             "max_abs_loglikelihood_diff": worst}
        nan = float("nan")
        accs = f"{acc:.4f}/{m.get('acc', nan):.4f}"
        norms = f"{acc_norm:.4f}/{m.get('acc_bytes', nan):.4f}"
        print(f"{task.name:<16} {n:>6} {accs:>22} {norms:>21} {m.get('acc_norm', nan):>16.4f} "
              f"{agree['acc']:>5}/{n:<4} {agree['acc_norm']:>5}/{n:<4} {worst:>10.2e}")
    print(json.dumps(report))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
