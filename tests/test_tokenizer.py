"""The byte-level tokenizers (BPE and Unigram): exact round trips, single-id specials, files that
load elsewhere; a Unigram run end to end."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtrain.config import load_config
from lmtrain.errors import DataError, RunDirError, TokenizerError
from lmtrain.prepare import train_tokenizer
from lmtrain.tokenizer import load_tokenizer


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def trained(tmp_path_factory, request):
    from conftest import make_text_corpus

    root = tmp_path_factory.mktemp("tok")
    corpus = make_text_corpus(root / "corpus")
    cfg = load_config(None, [f"run.dir={root / 'run'}", f"data.source={corpus}",
                             "tokenizer.vocab_size=400", "data.val_fraction=0.2",
                             "tokenizer.special_tokens=[<|endoftext|>, <|pad|>]", f"tokenizer.model={request.param}"])
    stats = train_tokenizer(cfg)
    return cfg, stats, load_tokenizer(cfg.run_dir)


def roundtrip(tokenizer, text: str) -> str:
    return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)


@pytest.mark.parametrize("text", [
    "", "def f(x):\n    return x\n", "emoji 🎉🐍 and flags 🇫🇷", "中文字符 日本語 한국어",
    "e\u0301 combining, a\u0308\u0304 stacked", "nul\x00 bell\x07 esc\x1b", "lone\rcarriage\r\n",
    "x" * 100_000, "  leading and trailing  ", "\t\ttabs\n\n\n", "<|endoftext|> inside text",
])
def test_round_trip_exact(trained, text):
    _, _, tok = trained
    assert roundtrip(tok, text) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_round_trip_any_string(trained, text):
    _, _, tok = trained
    assert roundtrip(tok, text) == text


def test_special_tokens_are_single_ids(trained):
    cfg, _, tok = trained
    ids = [tok.token_to_id(t) for t in cfg.tokenizer.special_tokens]
    assert ids == [0, 1]
    assert tok.encode("a<|endoftext|>b<|pad|>", add_special_tokens=False).ids.count(0) == 1


def test_file_loads_in_tokenizers_and_stats_are_right(trained):
    from tokenizers import Tokenizer

    cfg, stats, tok = trained
    path = cfg.run_dir / "tokenizer" / "tokenizer.json"
    size = Tokenizer.from_file(str(path)).get_vocab_size()
    saved = json.loads((cfg.run_dir / "tokenizer" / "stats.json").read_text())
    assert saved["vocab_size"] == size == stats.vocab_size
    # BPE merges until the vocabulary is full; Unigram prunes its candidates to at most the size
    # asked for, and on a small corpus there are fewer pieces worth keeping.
    assert size == 400 if cfg.tokenizer.model == "bpe" else 256 + 2 < size <= 400
    train_docs = [p for p in sorted((cfg.run_dir.parent / "corpus").iterdir())]
    from lmtrain.corpus import iter_split

    expected = list(iter_split(cfg.data, "train"))
    assert saved["documents"] == len(expected) < len(train_docs)
    assert saved["utf8_bytes"] == sum(len(d.text.encode()) for d in expected)
    assert saved["measured_on"] == "val"
    assert (1.5 if cfg.tokenizer.model == "bpe" else 1.2) < saved["bytes_per_token"] < 10
    assert (cfg.run_dir / "config.yaml").exists()


def test_tokenizer_never_saw_val_documents(trained):
    # The val split is by hash of the text: the trainer is fed train documents only, so the
    # document counts in stats.json add up to the train split alone (checked above); here we
    # check the split is not empty, or that check would be vacuous.
    cfg, _, _ = trained
    from lmtrain.corpus import iter_split

    assert list(iter_split(cfg.data, "val"))


def test_second_run_refuses_without_force(trained):
    cfg, stats, _ = trained
    with pytest.raises(RunDirError, match="already exists.*--force"):
        train_tokenizer(cfg)
    again = train_tokenizer(cfg, force=True)
    if cfg.tokenizer.model == "bpe":
        assert again.sha256 == stats.sha256  # same corpus and settings: the same tokenizer
    # (tokenizers' Unigram trainer is not deterministic: it walks hash maps seeded at random, so a
    # retrained Unigram may differ slightly; the README says so.)


def test_empty_corpus_writes_nothing(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("   \n\n")
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", f"data.source={tmp_path / 'c'}"])
    with pytest.raises(DataError, match="no non-empty documents"):
        train_tokenizer(cfg)
    assert not (tmp_path / "run").exists()


def test_load_missing_and_corrupt(tmp_path):
    with pytest.raises(TokenizerError, match="run `lmtrain tokenize` first"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="is not a valid tokenizer"):
        load_tokenizer(tmp_path)


def test_loads_in_transformers(trained):
    transformers = pytest.importorskip("transformers")
    cfg, _, _ = trained
    tok = load_tokenizer(cfg.run_dir)  # the file as it is now (a test above retrains it)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(cfg.run_dir / "tokenizer" / "tokenizer.json"))
    text = "def f(x):\n    return x  # 🐍\n"
    assert fast.encode(text) == tok.encode(text).ids


@pytest.mark.slow
def test_a_unigram_run_trains_samples_and_exports_to_transformers_but_not_gguf(tmp_path):
    from conftest import TINY_TRAIN, make_text_corpus, run_cli, write_config

    transformers = pytest.importorskip("transformers")
    corpus = make_text_corpus(tmp_path / "corpus", n_docs=60)
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", corpus, tokenizer={"vocab_size": 300, "model": "unigram"},
                          model=TINY_TRAIN["model"], train={**TINY_TRAIN["train"], "max_steps": 4, "checkpoint_every": 4})
    for stage in ("tokenize", "shard", "train"):
        done = run_cli(stage, "--config", str(config))
        assert done.returncode == 0, done.stderr
    raw = json.loads((tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text())
    assert raw["model"]["type"] == "Unigram"
    sampled = run_cli("sample", "--run", str(tmp_path / "run"), "-n", "8", "--prompt", "def ")
    assert sampled.returncode == 0 and sampled.stdout.startswith("def "), sampled.stderr
    exported = run_cli("export", "--run", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(tmp_path / "run")
    text = "def f(x):\n    return x  # 🐍 ünï\n"
    assert fast(text)["input_ids"] == ours.encode(text, add_special_tokens=False).ids
    assert fast.decode(fast(text)["input_ids"]) == text
    gguf = run_cli("export", "--run", str(tmp_path / "run"), "--format", "gguf", "--out", str(tmp_path / "m.gguf"))
    assert gguf.returncode == 2 and "tokenizer.model: unigram" in gguf.stderr and "Traceback" not in gguf.stderr
    assert not (tmp_path / "m.gguf").exists()
