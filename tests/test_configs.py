"""The shipped configs load, and example.yaml documents every key there is."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from conftest import REPO
from lmtrain.config import SECTIONS, default_config_text, load_config


@pytest.mark.parametrize("name", ["default.yaml", "gpt2-small.yaml", "gpt2-medium.yaml", "gpt2-large.yaml",
                                  "gpt2-xl.yaml", "example.yaml"])
def test_shipped_configs_load(name):
    load_config(REPO / "configs" / name)


def test_example_documents_every_key():
    example = yaml.safe_load((REPO / "configs" / "example.yaml").read_text())
    for section, cls in SECTIONS.items():
        assert section in example, section
        assert set(example[section]) == {f.name for f in dataclasses.fields(cls)}, section


def test_embedded_default_is_the_shipped_file():
    assert default_config_text() == (REPO / "configs" / "default.yaml").read_text()


def test_gpt2_small_is_the_124m_shape():
    from lmtrain.step import build_model

    cfg = load_config(REPO / "configs" / "gpt2-small.yaml")
    import torch

    with torch.device("meta"):
        model = build_model(cfg.model, 50257)
    assert 123e6 < model.num_params() < 125e6


@pytest.mark.parametrize("name, low, high", [("gpt2-medium", 350e6, 360e6), ("gpt2-large", 770e6, 780e6),
                                             ("gpt2-xl", 1.55e9, 1.57e9)])
def test_bigger_configs_have_their_size_and_fit_80_gb(name, low, high):
    """Their parameter counts (SwiGLU keeps GPT-2's), 524,288 tokens per step, and an estimated
    peak under 80 GB with room to spare (the estimate leaves out allocator slack)."""
    import torch

    from lmtrain.memory import estimate

    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    need = estimate(cfg, 50257, torch.bfloat16)
    assert low < need.parameters < high
    assert cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size == 524288
    assert need.total < 0.7 * 80 * 1024 ** 3
