"""slm preprocess's inputs besides JSONL: parquet, Arrow (datasets' save_to_disk, DatasetDict, the
load_dataset cache, the IPC file format), .jsonl.zst and .jsonl.gz, and its refusals of unusable inputs.

The truth is the JSONL path: the same documents written as JSONL give .bin/.idx bytes that every other format
must reproduce, with one worker and with two (document order is the input order). The JSONL path itself is
checked against megatron-core's IndexedDatasetBuilder fed one document at a time with sentencepiece's ids. The
real files are written by pyarrow, datasets and zstandard, not by the code under test.
"""

import gzip
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import zstandard

from megatron_slm.data import preprocess as pp
from megatron_slm.data.preprocess import PreprocessError, preprocess

pytestmark = pytest.mark.unit

WORDS = (
    "the reference scores every token and only the top fraction enters the loss; integral sum prime 12 345 "
    'x^2 + y^2 = z^2, café naïve über — “quotes” 数学 \\ backslash "quoted"'
).split()


def _documents(seed: int, n: int) -> list:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(n)]
    docs[3] = ""  # empty: skipped and counted
    docs[4] = " \t\n  "  # blank: skipped and counted
    docs[5] = "line one\nline two\r\n\n  indented"  # newlines inside a document survive (JSON escapes)
    docs[6] = " ".join(WORDS) * 8  # longer than the tests' BATCH_BYTES: a task of its own
    return docs


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A tiny sentencepiece BPE model (vocab 200) trained here."""
    rng = random.Random(0)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)),
        model_writer=buf,
        vocab_size=200,
        model_type="bpe",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sp") / "tiny.model"
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture
def small_tasks(monkeypatch):
    """Tasks of ~400 bytes: many per file, lines that span blocks, more tasks than the pool keeps in flight."""
    monkeypatch.setattr(pp, "BATCH_BYTES", 400)


def _jsonl_bytes(docs, key="text") -> bytes:
    """One JSON object per line, with a blank and a whitespace-only line (no documents) every 50 lines."""
    return "".join(
        json.dumps({"id": i, key: t}) + ("\n\n  \r\n" if i % 50 == 7 else "\n") for i, t in enumerate(docs)
    ).encode()


def _outputs(prefix: Path):
    meta = json.loads(prefix.with_suffix(".json").read_text())
    # fields that name the input, and the .bin's mtime (another file, another time)
    meta.pop("inputs")
    meta["token_ids_bin"].pop("mtime_ns")
    return prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes(), meta


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sp_model):
    """The documents and the JSONL path's outputs (the truth), made with the small tasks."""
    d = tmp_path_factory.mktemp("truth")
    docs = _documents(1, 240)
    (d / "docs.jsonl").write_bytes(_jsonl_bytes(docs))
    mp = pytest.MonkeyPatch()
    mp.setattr(pp, "BATCH_BYTES", 400)
    try:
        preprocess([d / "docs.jsonl"], d / "truth", sp_model, workers=2)
    finally:
        mp.undo()
    return docs, _outputs(d / "truth")


def test_jsonl_path_equals_megatron_builder_document_by_document(tmp_path, sp_model, corpus):
    """The truth itself: megatron-core's builder, one add_document per non-blank document, sentencepiece ids."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    docs, (bin_bytes, idx_bytes, meta) = corpus
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=DType.optimal_dtype(sp.get_piece_size()))
    kept = [t for t in docs if t.strip()]
    for t in kept:
        ids = sp.encode(t) + [sp.eos_id()]
        builder.add_document(np.array(ids), [len(ids)])
    builder.finalize(str(tmp_path / "ref.idx"))
    assert bin_bytes == (tmp_path / "ref.bin").read_bytes()
    assert idx_bytes == (tmp_path / "ref.idx").read_bytes()
    assert (meta["num_documents"], meta["num_empty_skipped"]) == (len(kept), 2)


def _write_parquet(docs, d: Path) -> Path:
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), d / "docs.parquet", row_group_size=37)
    return d / "docs.parquet"


def _write_save_to_disk(docs, d: Path) -> Path:
    import datasets

    datasets.Dataset.from_dict({"id": list(range(len(docs))), "text": docs}).save_to_disk(d / "ds", num_shards=3)
    return d / "ds"


def _write_dataset_dict(docs, d: Path) -> Path:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(d / "dd")
    return d / "dd"


def _write_load_dataset_cache(docs, d: Path) -> Path:
    """load_dataset's own cache directory (one split, here from a local parquet file: no network)."""
    import datasets

    src = _write_parquet(docs, d)
    ds = datasets.load_dataset("parquet", data_files={"train": str(src)}, cache_dir=str(d / "cache"), split="train")
    folder = Path(ds.cache_files[0]["filename"]).parent
    src.unlink()
    return folder


def _write_arrow_file_format(docs, d: Path) -> Path:
    table = pa.table({"text": docs, "id": list(range(len(docs)))})
    with pa.ipc.new_file(str(d / "docs.arrow"), table.schema) as w:
        for b in table.to_batches(max_chunksize=50):
            w.write_batch(b)
    return d / "docs.arrow"


def _write_zst(docs, d: Path) -> Path:
    """Two zstd frames (as concatenated or multi-threaded zstd writes), the cut inside a line; the last line
    without its newline."""
    data = _jsonl_bytes(docs).rstrip(b"\n")
    c = zstandard.ZstdCompressor(level=3)
    (d / "docs.jsonl.zst").write_bytes(c.compress(data[:1001]) + c.compress(data[1001:]))
    return d / "docs.jsonl.zst"


def _write_gz(docs, d: Path) -> Path:
    (d / "docs.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(docs)))
    return d / "docs.jsonl.gz"


WRITERS = {
    "parquet": _write_parquet,
    "save_to_disk": _write_save_to_disk,
    "dataset_dict": _write_dataset_dict,
    "load_dataset_cache": _write_load_dataset_cache,
    "arrow_file_format": _write_arrow_file_format,
    "jsonl.zst": _write_zst,
    "jsonl.gz": _write_gz,
}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_every_format_gives_the_jsonl_bytes(tmp_path, sp_model, corpus, small_tasks, kind):
    docs, truth = corpus
    source = WRITERS[kind](docs, tmp_path)
    for workers in (1, 2):
        meta = preprocess([source], tmp_path / f"out{workers}", sp_model, workers=workers)
        got = _outputs(tmp_path / f"out{workers}")
        assert got[0] == truth[0] and got[1] == truth[1], f"{kind}, {workers} worker(s): not the JSONL bytes"
        assert got[2] == truth[2], f"{kind}, {workers} worker(s): metadata differs from the JSONL run's"
    if kind == "save_to_disk":  # its shards, in state.json's order
        assert meta["inputs"] == [str(source / f"data-0000{i}-of-00003.arrow") for i in range(3)]


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk", "arrow_file_format"])
def test_row_groups_and_batches_too_large_for_one_task(tmp_path, sp_model, corpus, small_tasks, monkeypatch, kind):
    """Row groups / record batches with more than GROUP_BYTES of text are read by the main process and sent
    in pieces; smaller ones are one task each, read by the worker (the other test)."""
    docs, truth = corpus
    source = WRITERS[kind](docs, tmp_path)
    files = pp.expand_inputs([source])
    assert {t[0] for t in pp._tasks(files, "text", False)} == {"parquet_group" if kind == "parquet" else "arrow_batch"}
    monkeypatch.setattr(pp, "GROUP_BYTES", 100)
    monkeypatch.setattr(pp, "COLUMN_BATCH_ROWS", 10)
    tasks = list(pp._tasks(files, "text", False))
    assert {t[0] for t in tasks} == {"column"} and len(tasks) > len(docs) // 37
    for workers in (1, 2):
        preprocess([source], tmp_path / f"out{workers}", sp_model, workers=workers)
        assert _outputs(tmp_path / f"out{workers}") == truth


def test_text_column_chosen_with_json_key(tmp_path, sp_model, corpus):
    docs, truth = corpus
    pq.write_table(pa.table({"text": ["decoy"] * len(docs), "content": docs}), tmp_path / "c.parquet")
    preprocess([tmp_path / "c.parquet"], tmp_path / "c", sp_model, json_key="content", workers=2)
    (tmp_path / "c.jsonl").write_bytes(_jsonl_bytes(docs, key="content"))
    preprocess([tmp_path / "c.jsonl"], tmp_path / "j", sp_model, json_key="content", workers=2)
    assert _outputs(tmp_path / "c") == _outputs(tmp_path / "j")
    assert _outputs(tmp_path / "c")[:2] == truth[:2]


def test_directory_of_mixed_formats_in_sorted_order(tmp_path, sp_model, corpus, small_tasks):
    """A directory: its files depth first in name order, a datasets directory as its shards, never its .json
    metadata read as JSONL."""
    docs, _ = corpus
    root = tmp_path / "root"
    (root / "b_dataset").mkdir(parents=True)
    _write_parquet(docs[:100], root)  # root/docs.parquet
    _write_save_to_disk(docs[100:180], root / "b_dataset")  # root/b_dataset/ds/
    (root / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(docs[180:])))
    for workers in (1, 2):
        preprocess([root], tmp_path / f"mixed{workers}", sp_model, workers=workers)
    (tmp_path / "order.jsonl").write_bytes(_jsonl_bytes(docs[180:] + docs[100:180] + docs[:100]))
    preprocess([tmp_path / "order.jsonl"], tmp_path / "order", sp_model, workers=1)
    for workers in (1, 2):
        assert _outputs(tmp_path / f"mixed{workers}") == _outputs(tmp_path / "order")


def test_text_files_compressed(tmp_path, sp_model):
    text = "first line\n\nsecond  line\r\nthird — 数学\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    (tmp_path / "t.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    for split_lines in (False, True):
        preprocess([tmp_path / "t.txt"], tmp_path / "plain", sp_model, split_lines=split_lines, force=True)
        preprocess([tmp_path / "t.txt.zst"], tmp_path / "zst", sp_model, split_lines=split_lines, force=True)
        assert _outputs(tmp_path / "plain")[:2] == _outputs(tmp_path / "zst")[:2]
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "zst"))
    assert [ds[i].tolist() for i in range(len(ds))] == [
        sp.encode(t) + [sp.eos_id()] for t in ("first line", "second  line", "third — 数学")
    ]


# ------------------------------------------------------------------------------------------------- refusals
def _refused(inputs, sp_model, tmp_path, match, **kw) -> str:
    for workers in (1, 2):
        with pytest.raises(PreprocessError, match=match) as e:
            preprocess(inputs, tmp_path / "failed", sp_model, workers=workers, **kw)
        assert "\n" not in str(e.value)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("failed")], "a refusal leaves no output"
    return str(e.value)


def test_unknown_and_unreadable_inputs_are_refused_naming_file_and_formats(tmp_path, sp_model):
    good = tmp_path / "good.jsonl"
    good.write_bytes(_jsonl_bytes(["the loss"]))
    junk = random.Random(3).randbytes(3000)
    files = {
        "notes.md": b"# a readme",
        "data.csv": b"text\nthe loss\n",
        "x.parquet": junk,
        "x.arrow": junk,
        "x.jsonl.zst": junk,
        "x.jsonl.gz": junk,
        "x.parquet.gz": junk,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        # the bad file comes last: refused before the good one is tokenized
        msg = _refused([good, tmp_path / name], sp_model, tmp_path, "supported formats: ")
        assert str(tmp_path / name) in msg and ".parquet" in msg and "save_to_disk" in msg, msg
        (tmp_path / name).unlink()
    # a directory holding an unknown file is refused too (a glob picks the files to read)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_bytes(_jsonl_bytes(["the loss"]))
    (tmp_path / "d" / "README.md").write_text("about")
    assert "README.md" in _refused([tmp_path / "d"], sp_model, tmp_path, "unknown format")
    meta = preprocess([str(tmp_path / "d" / "*.jsonl")], tmp_path / "ok", sp_model)
    assert meta["num_documents"] == 1


def test_missing_or_wrong_text_column_is_refused_naming_columns(tmp_path, sp_model):
    import datasets

    pq.write_table(pa.table({"id": [1, 2], "content": ["a", "b"]}), tmp_path / "c.parquet")
    msg = _refused([tmp_path / "c.parquet"], sp_model, tmp_path, r"has no column 'text' \(columns: id, content\)")
    assert "c.parquet" in msg and "--json-key" in msg
    datasets.Dataset.from_dict({"body": ["a"], "n": [1]}).save_to_disk(tmp_path / "ds")
    _refused(
        [tmp_path / "ds"],
        sp_model,
        tmp_path,
        r"data-00000-of-00001\.arrow has no column 'text' "
        r"\(columns: body, n\)",
    )
    _refused([tmp_path / "c.parquet"], sp_model, tmp_path, r"column 'id' holds int64, expected strings", json_key="id")


def test_null_text_is_refused_naming_its_row(tmp_path, sp_model, small_tasks, monkeypatch):
    texts = _documents(4, 240)
    texts[201] = None
    table = pa.table({"text": texts})
    pq.write_table(table, tmp_path / "n.parquet", row_group_size=37)
    with pa.ipc.new_stream(str(tmp_path / "n.arrow"), table.schema) as w:
        for b in table.to_batches(max_chunksize=50):
            w.write_batch(b)
    for large in (False, True):
        if large:  # groups and batches read by the main process, in pieces
            monkeypatch.setattr(pp, "GROUP_BYTES", 100)
            monkeypatch.setattr(pp, "COLUMN_BATCH_ROWS", 10)
        for name in ("n.parquet", "n.arrow"):
            _refused([tmp_path / name], sp_model, tmp_path, rf"{name} row 201 \(from 0\): column 'text' is null")


def test_datasets_directories_that_name_no_single_split_are_refused(tmp_path, sp_model):
    import datasets

    two = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["a"]}), "test": datasets.Dataset.from_dict({"text": ["b"]})}
    )
    two.save_to_disk(tmp_path / "dd")
    msg = _refused([tmp_path / "dd"], sp_model, tmp_path, r"DatasetDict with the splits train, test")
    assert str(tmp_path / "dd" / "train") in msg
    meta = preprocess([tmp_path / "dd" / "train"], tmp_path / "train", sp_model)
    assert meta["num_documents"] == 1

    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "p.parquet")
    ds = datasets.load_dataset(
        "parquet",
        data_files={"train": str(tmp_path / "p.parquet"), "test": str(tmp_path / "p.parquet")},
        cache_dir=str(tmp_path / "cache"),
    )
    cache = Path(ds["train"].cache_files[0]["filename"]).parent
    msg = _refused([cache], sp_model, tmp_path, r"datasets cache with the splits train, test")
    meta = preprocess([str(cache / "parquet-train*.arrow")], tmp_path / "cache_train", sp_model)  # as it advises
    assert meta["num_documents"] == 2 and "parquet-train*.arrow" in msg

    datasets.Dataset.from_dict({"text": ["a", "b", "c"]}).save_to_disk(tmp_path / "ds", num_shards=3)
    (tmp_path / "ds" / "data-00001-of-00003.arrow").unlink()
    _refused([tmp_path / "ds"], sp_model, tmp_path, r"state\.json lists data-00001-of-00003\.arrow, missing")


@pytest.mark.parametrize("compressed", [False, True])
def test_bad_line_is_named_by_its_line_number_across_tasks(tmp_path, sp_model, small_tasks, compressed):
    lines = _jsonl_bytes(_documents(2, 120)).splitlines(keepends=True)
    lines.insert(96, b"{broken\n")  # line 97
    data = b"".join(lines)
    path = tmp_path / ("b.jsonl.zst" if compressed else "b.jsonl")
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if compressed else data)
    _refused([path], sp_model, tmp_path, rf"{path.name} line 97 is not valid JSON")
    assert len(list(pp._tasks([path], "text", False))) > 10  # the bad line is far from the first task


def test_cli_refusals_are_one_line_exit_2(tmp_path, sp_model):
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "c.parquet")
    (tmp_path / "notes.md").write_text("about")
    cases = [("c.parquet", "has no column 'text' (columns: body)"), ("notes.md", "supported formats: ")]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "megatron_slm.cli",
                "preprocess",
                name,
                "--tokenizer",
                str(sp_model),
                "--output-prefix",
                "out",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, _ in cases
    ]
    for p, (name, needle) in zip(procs, cases):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert name in err and needle in err, err
    assert not (tmp_path / "out.bin").exists()
