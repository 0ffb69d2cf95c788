"""The code's layout holds: one model schema, inference apart from training, scripts use the package."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from conftest import REPO
from lmtrain.config import ArchitectureConfig, ModelConfig
from lmtrain.model import GPTConfig


def test_model_schema_is_the_config_section_plus_the_vocabulary():
    # GPTConfig extends ModelConfig: a new model.* key is a field of the model's config by construction.
    architecture = [f.name for f in dataclasses.fields(ArchitectureConfig)]
    assert [f.name for f in dataclasses.fields(GPTConfig)] == architecture + ["vocab_size"]
    assert [f.name for f in dataclasses.fields(ModelConfig)] == architecture + ["init_from"]
    defaults = ModelConfig()
    built = GPTConfig.of(defaults, 4096)
    assert {k: v for k, v in built.to_dict().items() if k != "vocab_size"} == {
        k: v for k, v in dataclasses.asdict(defaults).items() if k != "init_from"}
    assert GPTConfig(**json.loads(json.dumps(built.to_dict()))) == built  # what checkpoints store


@pytest.mark.slow
def test_inference_sampling_and_eval_do_not_import_training():
    code = ("import sys, lmtrain.inference, lmtrain.generate, lmtrain.sample, lmtrain.evaluate; "
            "print([m for m in ('lmtrain.train', 'lmtrain.step', 'lmtrain.optim', 'lmtrain.metrics') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_model_file_defines_no_cache_and_scripts_do_not_patch_the_path():
    model_source = (REPO / "lmtrain" / "model.py").read_text()
    assert "class KVCache" not in model_source and "device.type ==" not in model_source
    for script in (REPO / "scripts").glob("*.py"):
        assert "sys.path.insert" not in script.read_text(), script.name


def _imports() -> dict[str, set[str]]:
    """Each lmtrain module's imports of other lmtrain modules, imports inside functions included."""
    import ast

    package = REPO / "lmtrain"
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in modules:
        edges = set()
        for node in ast.walk(ast.parse((package / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "lmtrain":
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmtrain."):
                edges.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                edges |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lmtrain.")}
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def _third_party(name: str) -> set[str]:
    import ast

    tree = ast.parse((REPO / "lmtrain" / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_no_import_cycles_between_modules_counting_imports_inside_functions():
    graph = _imports()
    # Every module reachable from each module; a cycle is a module that reaches itself.
    cycles = []
    for start in sorted(graph):
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += graph[module]
        if start in seen:
            cycles.append(start)
    assert cycles == [], f"modules on an import cycle: {cycles}"


def test_formats_and_policies_keep_their_side_of_the_line():
    graph = _imports()
    # The budget is arithmetic over measured costs: no torch, no training loop.
    assert "torch" not in _third_party("budget") and not graph["budget"] & {"train", "step", "timing"}
    # The checkpoint format knows files, not what restores them (LoRA, pretrained sources).
    assert not graph["checkpoint"] & {"lora", "pretrained", "restore"}
    # Formats do not run stages: the tokenizer and shard formats never reach the stage module.
    assert "prepare" not in graph["tokenizer"] | graph["shards"] and "pretrained" not in graph["shards"]
