"""The real entry point, the way a user types it: help, version, tokenize, error exits."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import run_cli, write_config


@pytest.mark.slow
def test_help_and_version_do_not_import_heavy_libraries():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from lmtrain.cli import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(app, ['tokenize', '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'datasets', 'tensorboard') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("lmtrain ")


@pytest.mark.slow
def test_tokenize_end_to_end(tmp_path, text_corpus):
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", text_corpus)
    result = run_cli("tokenize", "--config", str(config), "--set", "tokenizer.vocab_size=320")
    assert result.returncode == 0, result.stderr
    assert "tokenizer: vocab 320" in result.stdout
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").exists()
    assert "vocab_size: 320" in (tmp_path / "run" / "config.yaml").read_text()

    again = run_cli("tokenize", "--config", str(config))
    assert again.returncode == 2
    assert "already exists" in again.stderr and "Traceback" not in again.stderr
    forced = run_cli("tokenize", "--config", str(config), "--force")
    assert forced.returncode == 0, forced.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "tokenizer.vocab_sise=300"], "did you mean tokenizer.vocab_size?"),
        (["--set", "tokenizer.vocab_size=100"], "tokenizer.vocab_size: must be at least"),
        (["--set", "data.source={tmp}/missing"], "no such file or directory"),
        (["--set", "data.source={tmp}/*.none"], "matches no files"),
        (["--set", "data.source=hf:a/b/c"], "expected hf:owner/name"),
    ],
)
def test_user_errors_exit_2_with_one_line_and_write_nothing(tmp_path, text_corpus, args, message):
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", text_corpus)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = run_cli("tokenize", "--config", str(config), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([l for l in result.stderr.splitlines() if l.startswith("error:")]) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_missing_config_file(tmp_path):
    result = run_cli("tokenize", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "config file not found" in result.stderr
