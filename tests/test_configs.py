"""The shipped configs load, and example.yaml documents every key there is."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from conftest import REPO
from lmtrain.config import SECTIONS, default_config_text, load_config


@pytest.mark.parametrize("name", ["default.yaml", "gpt2-small.yaml", "example.yaml"])
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
