"""The code's layout holds: one model schema, inference apart from training, scripts use the package."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

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
