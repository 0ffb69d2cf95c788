"""Config loading: defaults, overrides, and every rejection with the message a user sees."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmtrain.config import Config, config_from_dict, load_config
from lmtrain.errors import ConfigError


def test_embedded_default_loads_and_fills_defaults():
    cfg = load_config(None)
    assert cfg.data.source == "builtin:pystdlib"
    assert cfg.run.dir == str(Path("runs") / cfg.run.name)
    assert cfg.tokenizer.special_tokens[0] == "<|endoftext|>"


def test_overrides_are_parsed_as_yaml_scalars():
    cfg = load_config(None, ["tokenizer.vocab_size=4096", "run.name=abc", "data.val_fraction=1e-2"])
    assert cfg.tokenizer.vocab_size == 4096
    assert cfg.run.name == "abc" and cfg.run.dir == str(Path("runs") / "abc")
    assert cfg.data.val_fraction == pytest.approx(0.01)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["run.dir=" + str(tmp_path / "r")])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_file_then_override_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tokenizer:\n  vocab_size: 1000\n")
    assert load_config(path).tokenizer.vocab_size == 1000
    assert load_config(path, ["tokenizer.vocab_size=2000"]).tokenizer.vocab_size == 2000


def _error(text: str | None = None, overrides=(), raw_bytes: bytes | None = None, tmp_path=None) -> str:
    path = tmp_path / "c.yaml"
    if raw_bytes is not None:
        path.write_bytes(raw_bytes)
    else:
        path.write_text(text or "")
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message  # always one line
    return message


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("tokenizer:\n  vocab_sise: 10\n", (), "unknown key tokenizer.vocab_sise; did you mean tokenizer.vocab_size?"),
        ("tokeniser:\n  vocab_size: 10\n", (), "unknown section 'tokeniser'; did you mean tokenizer?"),
        ("tokenizer:\n  vocab_size: lots\n", (), "tokenizer.vocab_size: expected an integer, got a string 'lots'"),
        ("tokenizer:\n  vocab_size: 100\n", (), "tokenizer.vocab_size: must be at least 257 (256 byte tokens + 1 special tokens), got 100"),
        ("data:\n  val_fraction: 1.5\n", (), "data.val_fraction: must be >= 0.0 and < 1.0, got 1.5"),
        ("data:\n  sample_by: word\n", (), "data.sample_by: must be one of 'document', 'paragraph', 'line'"),
        ("run:\n  seed: -1\n", (), "run.seed: must be >= 0, got -1"),
        ("data: [1, 2]\n", (), "section 'data' must be a mapping"),
        ("- a\n- b\n", (), "must be a mapping of sections"),
        ("", (), "is empty"),
        ("run:\n  name: [unclosed\n", (), "invalid YAML in"),
        ("run: !!python/object/apply:os.system ['echo hi']\n", (), "tags that construct Python objects are not allowed"),
        ("{}\n", ("tokenizer.vocab_size",), "expected section.key=value"),
        ("{}\n", ("tokenizer.vocab_sise=1",), "unknown key tokenizer.vocab_sise; did you mean tokenizer.vocab_size?"),
        ("{}\n", ("nosuch.key=1",), "unknown section 'nosuch'"),
        ("{}\n", ("vocab_size=1",), "the key must be section.key"),
        ("{}\n", ("tokenizer.vocab_size=big",), "tokenizer.vocab_size: expected an integer"),
        ("tokenizer:\n  special_tokens: []\n", (), "tokenizer.special_tokens: needs at least one token"),
        ("data:\n  val_fraction: 0\n", (), "data.val_fraction: must be > 0 unless data.val_source"),
    ],
)
def test_rejections_name_the_key(tmp_path, text, overrides, expected):
    assert expected in _error(text, overrides, tmp_path=tmp_path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    message = _error("run:\n  name: ok\ndata:\n  source: [oops\n", tmp_path=tmp_path)
    assert f"{tmp_path / 'c.yaml'}:" in message
    assert ":5:" in message or ":4:" in message


def test_not_utf8_and_missing_file(tmp_path):
    assert "is not UTF-8" in _error(raw_bytes=b"run:\n  name: \xff\xfe\n", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_python_tag_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    text = f"run: !!python/object/apply:os.system ['touch {marker}']\n"
    _error(text, tmp_path=tmp_path)
    assert not marker.exists()


def test_config_dataclass_defaults_are_independent():
    a, b = Config(), Config()
    a.tokenizer.special_tokens.append("<x>")
    assert b.tokenizer.special_tokens == ["<|endoftext|>"]


def test_every_key_is_described_for_lmtrain_keys():
    import dataclasses

    from lmtrain.config import SECTIONS, describe_keys

    listed = describe_keys().splitlines()
    fields = [(name, f) for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    assert len(listed) == len(fields)
    for line, (name, f) in zip(listed, fields):
        assert line.startswith(f"{name}.{f.name} = ") and f.metadata["help"] and line.endswith(f.metadata["help"])
    assert "train.lr = 0.001 (> 0; <= 1): peak learning rate" in listed
    assert any(line.startswith("model.norm = layernorm (one of layernorm, rmsnorm)") for line in listed)
    with pytest.raises(ConfigError, match="unknown section 'modle'; did you mean model"):
        describe_keys("modle")
