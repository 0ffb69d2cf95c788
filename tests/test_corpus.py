"""Corpus sources: every local format, globs, directories, the embedded corpus, the split."""

from __future__ import annotations

import json

import pytest

from lmtrain.config import DataConfig
from lmtrain.corpus import check_sources, iter_documents, iter_split, pystdlib_files
from lmtrain.errors import DataError


def texts(source, **kw):
    return [d.text for d in iter_documents(str(source), DataConfig(source=str(source), **kw))]


def test_txt_sample_by_document_paragraph_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\ntwo\n\nthree\n")
    assert texts(path) == ["one\ntwo\n\nthree\n"]
    assert [t.strip() for t in texts(path, sample_by="paragraph")] == ["one\ntwo", "three"]
    assert texts(path, sample_by="line") == ["one", "two", "three"]


def test_jsonl_json_csv_parquet_with_text_field(tmp_path):
    rows = [{"body": "first doc", "id": 1}, {"body": "second doc", "id": 2}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.csv").write_text("body,id\nfirst doc,1\nsecond doc,2\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["first doc", "second doc"], "id": [1, 2]}), tmp_path / "d.parquet")
    for name in ("a.jsonl", "b.json", "c.csv", "d.parquet"):
        assert texts(tmp_path / name, text_field="body") == ["first doc", "second doc"], name


def test_missing_text_field_says_which_fields_exist(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"content": "x", "id": 1}\n')
    with pytest.raises(DataError, match=r"no field 'text' \(it has: 'content', 'id'\)"):
        texts(tmp_path / "a.jsonl")


def test_parquet_without_the_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"no field 'text' \(it has: 'body'\)"):
        texts(tmp_path / "d.parquet")


def test_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"a.jsonl: line 3 is not valid JSON"):
        texts(tmp_path / "a.jsonl")


def test_invalid_utf8_names_the_file(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe not utf-8\n")
    with pytest.raises(DataError, match=r"bad.txt: not valid UTF-8"):
        texts(tmp_path / "bad.txt")


def test_directory_and_glob_are_sorted_and_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "sub" / "c.txt").write_text("C")
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    assert texts(tmp_path) == ["A", "B", "C"]
    assert texts(str(tmp_path / "**" / "*.txt")) == ["A", "B", "C"]
    assert texts(str(tmp_path / "*.txt")) == ["A", "B"]


def test_empty_documents_are_skipped_and_max_documents_caps(tmp_path):
    for i, body in enumerate(["x", "   \n", "", "y", "z"]):
        (tmp_path / f"{i}.txt").write_text(body)
    assert texts(tmp_path) == ["x", "y", "z"]
    assert texts(tmp_path, max_documents=2) == ["x", "y"]


@pytest.mark.parametrize(
    "source, message",
    [
        ("{tmp}/nope.txt", "no such file or directory"),
        ("{tmp}/*.nothing", "matches no files"),
        ("{tmp}/x.bin", "unsupported extension"),
        ("builtin:nope", "unknown builtin corpus 'nope'"),
        ("hf:", "expected hf:owner/name"),
    ],
)
def test_bad_sources_fail_up_front(tmp_path, source, message):
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    source = source.format(tmp=tmp_path)
    with pytest.raises(DataError, match=message):
        check_sources(DataConfig(source=source))


def test_hub_unreachable_fails_fast_with_a_plain_message(monkeypatch):
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.monotonic()
    with pytest.raises(DataError, match="cannot reach the Hugging Face hub.*local files"):
        check_sources(DataConfig(source="hf:someone/corpus"))
    assert time.monotonic() - start < 10


def test_pystdlib_is_sorted_python_sources_without_tests():
    files = pystdlib_files()
    assert len(files) > 100
    assert all(f.suffix == ".py" for f in files)
    assert not any({"test", "tests", "site-packages"} & set(f.parts) for f in files)
    docs = list(iter_documents("builtin:pystdlib", DataConfig(max_documents=3)))
    assert len(docs) == 3 and all(d.text.strip() for d in docs)


def test_split_is_deterministic_disjoint_and_complete(tmp_path):
    for i in range(200):
        (tmp_path / f"{i:03d}.txt").write_text(f"document number {i}\n")
    cfg = DataConfig(source=str(tmp_path), val_fraction=0.2)
    train = [d.text for d in iter_split(cfg, "train")]
    val = [d.text for d in iter_split(cfg, "val")]
    assert train == [d.text for d in iter_split(cfg, "train")]
    assert not set(train) & set(val)
    assert len(train) + len(val) == 200
    assert 15 <= len(val) <= 65


def test_val_source_replaces_the_holdout(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    for i in range(10):
        (tmp_path / "train" / f"{i}.txt").write_text(f"t{i}")
    (tmp_path / "val" / "v.txt").write_text("v")
    cfg = DataConfig(source=str(tmp_path / "train"), val_source=str(tmp_path / "val"))
    assert len(list(iter_split(cfg, "train"))) == 10
    assert [d.text for d in iter_split(cfg, "val")] == ["v"]


def test_errors_in_a_many_file_source_name_the_file(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jsonl").write_text('{"text": "fine"}\n')
    (tmp_path / "3.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"3.jsonl: line 2 is not valid JSON"):
        texts(tmp_path)
    (tmp_path / "3.jsonl").write_text('{"body": "no text here"}\n')
    with pytest.raises(DataError, match=r"3.jsonl: no field 'text'"):
        texts(tmp_path)
