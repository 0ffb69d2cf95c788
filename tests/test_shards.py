"""Shards: exact round trip, header/manifest agreement, rollover, corruption detection, atomicity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import make_text_corpus, run_cli, write_config
from lmtrain import shards
from lmtrain.config import load_config
from lmtrain.corpus import iter_split
from lmtrain.errors import ShardError
from lmtrain.fsutil import sha256_file
from lmtrain.prepare import build_shards, train_tokenizer
from lmtrain.tokenizer import load_tokenizer


def make_run(root, n_docs=60, **overrides):
    corpus = make_text_corpus(root / "corpus", n_docs=n_docs)
    (corpus / "empty.txt").write_text("  \n")  # empty documents are skipped
    sets = [f"run.dir={root / 'run'}", f"data.source={corpus}", "tokenizer.vocab_size=300",
            "data.val_fraction=0.2", "shard.shard_tokens=4096"]
    sets += [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config(None, sets)
    train_tokenizer(cfg)
    return cfg


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    cfg = make_run(tmp_path_factory.mktemp("shards"))
    result = build_shards(cfg)
    return cfg, result


def data(cfg):
    return cfg.run_dir / "data"


def test_round_trip_decodes_to_the_documents_in_order(sharded):
    cfg, result = sharded
    tok = load_tokenizer(cfg.run_dir)
    eot = result.manifest.eot_id
    for split in ("train", "val"):
        ids = np.concatenate(shards.open_split(data(cfg), split)).astype(np.int64)
        assert ids[-1] == eot
        pieces = np.split(ids, np.flatnonzero(ids == eot) + 1)[:-1]
        decoded = [tok.decode(p[:-1].tolist(), skip_special_tokens=False) for p in pieces]
        assert decoded == [d.text for d in iter_split(cfg.data, split)]


def test_manifest_agrees_with_headers_and_rolls_over(sharded):
    cfg, result = sharded
    manifest = json.loads((data(cfg) / "manifest.json").read_text())
    train = [e for e in manifest["shards"] if e["split"] == "train"]
    assert len(train) > 1, "the corpus should fill more than one 4096-token shard"
    assert all(e["tokens"] == 4096 for e in train[:-1]) and 0 < train[-1]["tokens"] <= 4096
    assert [e["file"] for e in train] == [f"train-{i:05d}.bin" for i in range(len(train))]
    for entry in manifest["shards"]:
        path = data(cfg) / entry["file"]
        header = shards.read_header(path)
        assert header.tokens == entry["tokens"] and header.dtype == "uint16" == manifest["dtype"]
        assert header.tokenizer_sha256 == sha256_file(cfg.run_dir / "tokenizer" / "tokenizer.json")
        assert header.eot_id == manifest["eot_id"] and header.vocab_size == 300
        assert sha256_file(path) == entry["sha256"]
    totals = manifest["splits"]
    assert totals["train"]["tokens"] == sum(e["tokens"] for e in train)
    assert totals["train"]["documents"] == len(list(iter_split(cfg.data, "train")))
    assert totals["val"]["utf8_bytes"] == sum(len(d.text.encode()) for d in iter_split(cfg.data, "val"))


def test_dtype_switches_above_65536_and_uint32_round_trips(tmp_path):
    assert shards.dtype_for_vocab(65536) == "uint16"
    assert shards.dtype_for_vocab(65537) == "uint32"
    writer = shards.ShardWriter(tmp_path, "train", 5, 70000, 69999, "ab" * 32)
    writer.write_document(np.array([1, 65536, 69999], dtype=np.uint32), 10)
    writer.write_document(np.array([65535, 69998, 2, 69999], dtype=np.uint32), 12)
    records = writer.close()
    assert [r.tokens for r in records] == [5, 2]
    assert [r.documents for r in records] == [1, 1]  # a document counts where it ends
    manifest = shards.make_manifest({}, records, 70000, 69999, "ab" * 32)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest.to_dict()))
    ids = np.concatenate(shards.open_split(tmp_path, "train"))
    assert ids.dtype == np.dtype("<u4")
    assert ids.tolist() == [1, 65536, 69999, 65535, 69998, 2, 69999]


def test_second_run_is_up_to_date_and_config_change_rebuilds(sharded):
    cfg, _ = sharded
    assert build_shards(cfg).up_to_date
    changed = load_config(None, [f"{k}={v}" for k, v in [
        ("run.dir", cfg.run.dir), ("data.source", cfg.data.source), ("tokenizer.vocab_size", 300),
        ("data.val_fraction", 0.2), ("shard.shard_tokens", 8192)]])
    rebuilt = build_shards(changed)
    assert not rebuilt.up_to_date
    build_shards(cfg, force=True)  # back to the module's layout for the other tests


def test_two_runs_give_identical_bytes(tmp_path):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b")
    build_shards(a)
    build_shards(b)
    files = sorted(p.name for p in data(a).glob("*.bin"))
    assert files == sorted(p.name for p in data(b).glob("*.bin"))
    for name in files:
        assert (data(a) / name).read_bytes() == (data(b) / name).read_bytes()


def corrupt_copy(cfg, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(data(cfg), target)
    return target


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "train-00000.bin").write_bytes((d / "train-00000.bin").read_bytes()[:1000]), "truncated"),
    (lambda d: _patch(d / "train-00000.bin", 0, b"NOTASHRD"), "wrong magic"),
    (lambda d: _patch(d / "val-00000.bin", 300, b"\x07\x07"), "sha256"),
    (lambda d: (d / "train-00001.bin").unlink(), "shard file is missing"),
    (lambda d: (d / "manifest.json").unlink(), "run `lmtrain shard` first"),
    (lambda d: _edit_manifest(d, lambda m: m["shards"][0].update(tokens=4000)), "header tokens is 4096 but the manifest says 4000|add up to 10282 tokens but the split total says"),
    (lambda d: _edit_manifest(d, lambda m: m.update(vocab_size=512)), "header vocab_size is 300 but the manifest says 512"),
    (lambda d: _edit_manifest(d, lambda m: m["shards"][0].update(file="../../etc/passwd")), "refusing shard name"),
    (lambda d: (d / "manifest.json").write_text("{broken"), "not valid JSON"),
])
def test_verify_and_reader_detect_corruption(sharded, tmp_path, damage, message):
    cfg, _ = sharded
    target = corrupt_copy(cfg, tmp_path)
    damage(target)
    with pytest.raises(ShardError, match=message):
        shards.verify_shards(target)
    if message != "sha256":  # the reader checks headers and sizes, not hashes (that is --verify)
        with pytest.raises(ShardError, match=message):
            shards.open_split(target, "train")
            shards.open_split(target, "val")


def test_tokenizer_from_another_run_is_refused(sharded):
    cfg, _ = sharded
    with pytest.raises(ShardError, match="another tokenizer"):
        shards.open_split(data(cfg), "train", tokenizer_sha256="0" * 64)
    with pytest.raises(ShardError, match="tokenizer sha256"):
        shards.verify_shards(data(cfg), tokenizer_sha256="0" * 64)


def _patch(path, offset, raw):
    blob = bytearray(path.read_bytes())
    blob[offset:offset + len(raw)] = raw
    path.write_bytes(bytes(blob))


def _edit_manifest(directory, edit):
    manifest = json.loads((directory / "manifest.json").read_text())
    edit(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_interrupted_run_leaves_no_manifest_and_next_run_succeeds(tmp_path, monkeypatch):
    cfg = make_run(tmp_path)
    calls = {"n": 0}
    original = shards.ShardWriter.write_document

    def failing(self, ids, nbytes):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt  # as Ctrl-C midway
        return original(self, ids, nbytes)

    monkeypatch.setattr(shards.ShardWriter, "write_document", failing)
    with pytest.raises(KeyboardInterrupt):
        build_shards(cfg)
    assert not (data(cfg) / "manifest.json").exists()
    assert not list(data(cfg).glob("*.bin")) and not list(data(cfg).glob("*.tmp-*"))
    monkeypatch.setattr(shards.ShardWriter, "write_document", original)
    result = build_shards(cfg)
    assert not result.up_to_date
    assert shards.verify_shards(data(cfg)).shards == len(result.manifest.shards)


def test_empty_val_split_says_what_to_do(tmp_path):
    cfg = make_run(tmp_path, n_docs=3, **{"data.val_fraction": 0.0001})
    with pytest.raises(ShardError, match="val split came out empty.*data.val_fraction.*sample_by: paragraph"):
        build_shards(cfg)
    assert not (data(cfg) / "manifest.json").exists()


def test_missing_tokenizer_says_run_tokenize(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(Exception, match="run `lmtrain tokenize` first"):
        build_shards(cfg)


@pytest.mark.slow
def test_cli_shard_and_verify(tmp_path, text_corpus):
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", text_corpus, shard={"shard_tokens": 4096})
    assert run_cli("tokenize", "--config", str(config)).returncode == 0
    first = run_cli("shard", "--config", str(config))
    assert first.returncode == 0, first.stderr
    assert "shards: train" in first.stdout and "tokens/s" in first.stdout
    again = run_cli("shard", "--config", str(config))
    assert "up to date" in again.stdout
    ok = run_cli("shard", "--config", str(config), "--verify")
    assert ok.returncode == 0 and "all match the manifest" in ok.stdout
    _patch(tmp_path / "run" / "data" / "val-00000.bin", 260, b"\x01\x02\x03")
    bad = run_cli("shard", "--config", str(config), "--verify")
    assert bad.returncode == 2
    assert "val-00000.bin: sha256" in bad.stderr and "Traceback" not in bad.stderr


def test_unigram_byte_baseline(sharded):
    import math

    cfg, result = sharded
    val_text = "".join(d.text for d in iter_split(cfg.data, "val")).encode()
    train_text = "".join(d.text for d in iter_split(cfg.data, "train")).encode()
    counts = [train_text.count(bytes([b])) + 1 for b in range(256)]
    total = sum(counts)
    expected = -sum(math.log2(counts[b] / total) for b in val_text) / len(val_text)
    assert result.manifest.unigram_byte_bpb() == pytest.approx(expected, rel=1e-9)
