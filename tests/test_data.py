"""Data: file formats, packing without padding, exact positions, data-parallel slices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from parallm.errors import UserError
from parallm.tokenizer import train_bpe_tokenizer
from parallm.train.data import PackedDataLoader, PackedDataset, iter_texts
from parallm.utils.fs import find_files

DOCS = [f"document {i}: " + "word " * (3 + i % 7) for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(iter(DOCS), vocab_size=300)


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    (tmp_path / "a.txt").write_text(DOCS[0])
    with (tmp_path / "b.jsonl").open("w") as f:
        for doc in DOCS[1:20]:
            f.write(json.dumps({"text": doc, "id": 1}) + "\n")
    pq.write_table(pa.table({"text": DOCS[20:]}), tmp_path / "c.parquet")
    return find_files([str(tmp_path)], [".txt", ".jsonl", ".parquet"])


def test_every_format_is_read_in_order(files):
    assert [f.suffix for f in files] == [".txt", ".jsonl", ".parquet"]
    assert list(iter_texts(files, "text")) == DOCS


def test_packing_is_the_token_stream_with_eos_between_documents(files, tokenizer):
    ds = PackedDataset.from_files(files, tokenizer, seq_len=16, shuffle=False)
    expected = []
    for doc in DOCS:
        expected += tokenizer.encode(doc) + [tokenizer.eos_token_id]
    assert ds.tokens.tolist() == expected
    assert len(ds) == (len(expected) - 1) // 16
    assert ds.sample(1).tolist() == expected[16:33]  # 17 tokens: inputs 16 + one label shift


def test_loader_position_and_data_parallel_slices(files, tokenizer):
    ds = PackedDataset.from_files(files, tokenizer, seq_len=8, seed=3)
    single = PackedDataLoader(ds, global_batch_size=4, micro_batch_size=2)
    ranks = [
        PackedDataLoader(ds, global_batch_size=4, micro_batch_size=1, dp_rank=r, dp_degree=2)
        for r in range(2)
    ]
    for _ in range(2 * len(ds) // 4 + 1):  # across an epoch boundary (a new permutation)
        whole = single.next_rows()[:, :-1].numpy()
        parts = [r.next_rows()[:, :-1].numpy() for r in ranks]
        np.testing.assert_array_equal(whole, np.concatenate(parts))
    state = single.state_dict()
    resumed = PackedDataLoader(ds, global_batch_size=4, micro_batch_size=4)
    resumed.load_state_dict(state)
    whole = single.next_rows()[:, :-1].numpy()
    rows = resumed.next_rows()
    x, y = rows[:, :-1], rows[:, 1:]
    np.testing.assert_array_equal(whole, x.numpy())
    np.testing.assert_array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())  # labels shift by one


def test_epochs_are_different_permutations(files, tokenizer):
    ds = PackedDataset.from_files(files, tokenizer, seq_len=8, seed=0)
    n = len(ds)
    first = [tuple(ds.sample(i)) for i in range(n)]
    second = [tuple(ds.sample(n + i)) for i in range(n)]
    assert sorted(first) == sorted(second) and first != second


def test_tokenized_cache_is_reused(files, tokenizer, tmp_path):
    cache = tmp_path / "cache"
    a = PackedDataset.from_files(files, tokenizer, seq_len=8, cache_dir=str(cache))
    assert len(list(cache.glob("tokens-*.npy"))) == 1
    b = PackedDataset.from_files(files, tokenizer, seq_len=8, cache_dir=str(cache))
    np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"text": "ok"}\n{"body": "x"}\n', r"b.jsonl:2: no string field 'text'"),
        ('{"text": "ok"}\nnot json\n', r"b.jsonl:2: invalid JSON"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, match):
    (tmp_path / "b.jsonl").write_text(content)
    with pytest.raises(UserError, match=match):
        list(iter_texts([tmp_path / "b.jsonl"], "text"))


def test_bad_inputs(tmp_path, tokenizer):
    with pytest.raises(UserError, match="neither a file nor a directory"):
        find_files([str(tmp_path / "missing")], [".txt"])
    with pytest.raises(UserError, match="no files with extensions .txt"):
        find_files([str(tmp_path)], [".txt"])
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(UserError, match="fewer than one sample"):
        PackedDataset.from_files([tmp_path / "tiny.txt"], tokenizer, seq_len=64)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(UserError, match="no column 'text'"):
        list(iter_texts([tmp_path / "c.parquet"], "text"))


def test_max_files_spreads_and_exclude_skips(tmp_path):
    for sub in ("keep", "skip"):
        (tmp_path / sub).mkdir()
        for i in range(10):
            (tmp_path / sub / f"{i}.py").write_text("x")
    found = find_files([str(tmp_path)], [".py"], exclude=["skip"], max_files=4)
    assert [f.name for f in found] == ["0.py", "3.py", "6.py", "9.py"]
    assert all(f.parent.name == "keep" for f in found)
