"""Tokenize raw text into a megatron-core indexed dataset (``<prefix>.bin`` / ``<prefix>.idx``) + ``<prefix>.json``.

Inputs are files, directories (every non-hidden file below, recursively, in sorted order) or globs. The format
comes from the name (a ``.gz`` / ``.zst`` suffix is decompressed while reading, and the suffix before it counts):

    *.jsonl, *.json   one JSON object per line, the document's text under ``json_key`` (blank lines skipped)
    *.txt, *.text     UTF-8 text: the whole file is one document, or with ``split_lines`` each non-empty line
    *.parquet         one document per row, the text in the string column ``json_key`` (read a row group at a time)
    *.arrow           Arrow IPC (stream or file format), likewise
    a directory written by ``datasets`` (``Dataset.save_to_disk``, a ``DatasetDict`` of one split, or a
    ``load_dataset`` cache of one split): its .arrow files in the dataset's order

Any other file is refused before tokenizing starts, as is a file that does not open as its format or (parquet,
Arrow) lacks the text column. The same documents give the same output, byte for byte, in every format.

Documents are tokenized in ``workers`` processes over batches, collected strictly in input order (so the
output does not depend on the number of workers), each followed by the tokenizer's EOD id. Documents whose
text is empty or blank are skipped and counted. One document = one sequence = one ``add_document`` of
``IndexedDatasetBuilder``; the token dtype is ``DType.optimal_dtype(vocab_size)`` (uint16 below 65500).

``<prefix>.json`` records the tokenizer (path, kind, sha256 fingerprint, vocab size, EOD), the counts, the
dtype, the inputs, the .idx's sha256, the .bin's size and the range of its token ids (``min_token_id``,
``max_token_id``, valid for the .bin's size and mtime in ``token_ids_bin``; training rescans a .bin that
changed). A JSON line whose text holds a lone UTF-16 surrogate (``"\\ud800"``), which no tokenizer can
encode, is refused naming its file and line; a null text cell naming its file and row. Everything is written
under temporary names and renamed at the end (the .idx last), so an interrupted run never leaves a
complete-looking output.

    slm preprocess data/*.jsonl --tokenizer tokenizer.model --output-prefix data/train

Its command line is ``slm preprocess`` (megatron_slm/cli.py).
"""

import collections
import glob
import gzip
import importlib
import json
import multiprocessing
import multiprocessing.pool
import os
import re
import signal
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from megatron_slm.data.tokenizer import Tokenizer, load_tokenizer
from megatron_slm.errors import PreprocessError
from megatron_slm.log import progress_bar

TOOL = "megatron_slm preprocess_data"
TOOL_VERSION = "1"
JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".text")
COLUMNAR_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
SUPPORTED = (
    ".jsonl/.json (a JSON object per line) and .txt/.text, each also as .gz or .zst; .parquet; .arrow; "
    "a directory written by datasets' save_to_disk or load_dataset's cache"
)
HF_METADATA = {"state.json", "dataset_info.json", "dataset_infos.json", "dataset_dict.json"}
PIP_NAMES = {"pyarrow": "pyarrow", "pyarrow.parquet": "pyarrow", "zstandard": "zstandard"}
# Raw text bytes per worker task, about (a larger document is its own task), at most. The pool costs the main
# process ~0.3 ms per task: 1 MiB (~0.2 s of tokenizing) keeps that near 1 us per document (measured: 64 KiB
# tasks 30 us, 256 KiB 10 us, 1 MiB 5.5 us per document of ~4.7 KB in all). A smaller input gets smaller tasks,
# at least 8 per worker (down to MIN_TASK_BYTES), so that the workers also finish together.
BATCH_BYTES = 1 << 20
MIN_TASK_BYTES = 64 << 10
COLUMN_BATCH_ROWS = 1024  # rows decoded at a time from a parquet row group larger than GROUP_BYTES
GROUP_BYTES = 16 << 20  # a parquet row group / Arrow record batch of at most this much text: one task, read by
# its worker (datasets and datatrove write 1,000 rows, ~1-10 MB of text, per group)


# ------------------------------------------------------------------------------------------------ inputs
def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def _walk(root: Path) -> Iterator[Path]:
    """The input files below ``root``: a `datasets` directory as its data files in the dataset's order, else
    every non-hidden file, depth first in name order (the order of sorted(rglob), symlinked folders not
    followed), skipping the `datasets` metadata files, which describe a dataset and hold no documents."""
    layout = _dataset_dir_files(root)
    if layout is not None:
        yield from layout
        return
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if not entry.is_symlink():
                yield from _walk(entry)
        elif entry.is_file() and entry.name not in HF_METADATA:
            yield entry


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PreprocessError(f"cannot read input {path}: {_one_line(e)}; supported formats: {SUPPORTED}") from None
    if not isinstance(obj, dict):
        raise PreprocessError(
            f"cannot read input {path}: a JSON {type(obj).__name__}, not the object `datasets` "
            f"writes; supported formats: {SUPPORTED}"
        )
    return obj


def _dataset_dir_files(d: Path) -> list[Path] | None:
    """The .arrow data files of a `datasets` directory, in the dataset's row order; None if ``d`` is none.

    Read with pyarrow, not through `datasets`: ``load_from_disk`` itself only concatenates the IPC streams that
    state.json lists (save_to_disk writes the rows already in index order), and the builder cache holds one
    stream per split shard, so reading those files in that order is exact, needs no `datasets` install and
    streams batch by batch from a memory map (``load_dataset`` would also re-hash or copy the data)."""
    state = d / "state.json"
    if state.is_file():  # Dataset.save_to_disk
        entries = _read_json(state).get("_data_files")
        if (
            not isinstance(entries, list)
            or not entries
            or not all(isinstance(e, dict) and isinstance(e.get("filename"), str) for e in entries)
        ):
            raise PreprocessError(
                f"cannot read input {state}: no '_data_files' list of filenames, not a "
                f"datasets save_to_disk directory; supported formats: {SUPPORTED}"
            )
        files = [d / e["filename"] for e in entries]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise PreprocessError(
                f"input {d}: state.json lists {', '.join(missing)}, missing from the directory "
                f"(incomplete copy?); copy or re-save the whole dataset"
            )
        return files
    dict_json = d / "dataset_dict.json"
    if dict_json.is_file():  # DatasetDict.save_to_disk: one sub-directory per split
        splits = _read_json(dict_json).get("splits")
        if not isinstance(splits, list) or not splits:
            raise PreprocessError(f"cannot read input {dict_json}: no 'splits' list; supported formats: {SUPPORTED}")
        if len(splits) > 1:
            raise PreprocessError(
                f"input {d} is a DatasetDict with the splits {', '.join(map(str, splits))}; "
                f"name one split's directory, e.g. {d / str(splits[0])}"
            )
        return list(_walk(d / str(splits[0])))
    info = d / "dataset_info.json"
    arrows = sorted(p.name for p in d.glob("*.arrow") if p.is_file()) if info.is_file() else []
    if not arrows:
        return None
    # load_dataset's cache: <dataset_name>-<split>[-SSSSS-of-NNNNN].arrow, one stream per split shard
    meta = _read_json(info)
    name = meta.get("dataset_name") or meta.get("builder_name")
    splits = meta.get("splits") if isinstance(meta.get("splits"), dict) else {}
    found = {}
    for split in splits:
        pattern = re.compile(rf"{re.escape(str(name))}-{re.escape(str(split))}(?:-(\d+)-of-(\d+))?\.arrow")
        shards = {}
        for fname in arrows:
            m = pattern.fullmatch(fname)
            if m:
                shards[int(m.group(1) or 0)] = (fname, int(m.group(2) or 1))
        if shards:
            found[split] = shards
    if not found:
        raise PreprocessError(
            f"input {d} holds .arrow files ({', '.join(arrows[:4])}) but none of the splits its "
            f"dataset_info.json names; name the .arrow files to read (a glob keeps their order)"
        )
    if len(found) > 1:
        split = next(iter(found))
        raise PreprocessError(
            f"input {d} is a datasets cache with the splits {', '.join(map(str, found))}; name "
            f"one split's files, e.g. '{d / f'{name}-{split}*.arrow'}'"
        )
    shards = next(iter(found.values()))
    counts = {n for _, n in shards.values()}  # every shard says how many there are: all must be there, once
    if len(counts) != 1 or sorted(shards) != list(range(counts.pop())):
        raise PreprocessError(
            f"input {d}: the split's shards {', '.join(f for f, _ in shards.values())} are "
            f"incomplete; copy or rebuild the whole cache directory"
        )
    return [d / shards[i][0] for i in sorted(shards)]


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by ``inputs`` (files, directories searched recursively, globs), in order, each once; a
    `datasets` directory (save_to_disk, DatasetDict of one split, load_dataset cache of one split) stands for
    its .arrow files in the dataset's order."""
    if not inputs:
        raise PreprocessError(f"no inputs given; name one or more files, directories or globs ({SUPPORTED})")
    files, seen = [], set()

    def add(p: Path):
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            files.append(p)

    for item in inputs:
        s = str(item)
        p = Path(s)
        if p.is_file():
            add(p)
        elif p.is_dir():
            for f in _walk(p):
                add(f)
        elif not p.exists() and _has_magic(s):
            matches = sorted(glob.glob(s, recursive=True))
            if not matches:
                raise PreprocessError(f"input {s} matches no file")
            for m in matches:
                mp = Path(m)
                if mp.is_file():
                    add(mp)
                elif mp.is_dir():
                    for f in _walk(mp):
                        add(f)
        else:
            raise PreprocessError(f"input {s} does not exist")
    return files


def path_overlap(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> tuple[str, str] | None:
    """``(relation, input)`` when ``output`` is one of ``inputs`` ("is"), contains one ("contains") or lies inside
    one ("lies inside"), compared as real paths (symlinks resolved), else None; ``None`` inputs are skipped.
    Writing or replacing such an output destroys that input, so the tools refuse it even with --force (used by
    preprocessing and the checkpoint converters)."""
    out = Path(output).resolve()
    for item in inputs:
        if item is None:
            continue
        real = Path(item).resolve()
        if out == real:
            return "is", str(item)
        if real.is_relative_to(out):
            return "contains", str(item)
        if out.is_relative_to(real):
            return "lies inside", str(item)
    return None


def _format(path: Path) -> tuple[str | None, str | None]:
    """(``'json' | 'text' | 'parquet' | 'arrow'`` or None when unknown, ``'gzip' | 'zstd'`` or None), by name."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    inner = suffixes[-2] if comp and len(suffixes) >= 2 else (suffixes[-1] if suffixes and not comp else "")
    if inner in JSON_SUFFIXES:
        return "json", comp
    if inner in TEXT_SUFFIXES:
        return "text", comp
    if inner in COLUMNAR_SUFFIXES and comp is None:  # parquet compresses inside the file
        return COLUMNAR_SUFFIXES[inner], None
    return None, comp


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _needs(module: str, path: Path, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise PreprocessError(
            f"input {path} is {what}, which needs the '{module.split('.')[0]}' package: "
            f"pip install {PIP_NAMES[module]} (or the project's extra: pip install "
            f"'megatron_slm[data]')"
        ) from None


def _open(path: Path, comp: str | None):
    """A binary stream of the file's (decompressed) bytes, decompressed as it is read."""
    if comp == "gzip":
        return gzip.open(path, "rb")
    if comp == "zstd":
        zstd = _needs("zstandard", path, "zstandard-compressed")
        # read_across_frames: a read does not stop short at each frame's end (concatenated .zst files, or
        # multi-threaded zstd's, hold several frames)
        return zstd.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True)
    return open(path, "rb")


def _read_errors() -> tuple:
    """What reading a corrupt input raises: OSError / EOFError (files, gzip), ZstdError, ArrowException."""
    errors = [OSError, EOFError]
    for module, name in (("zstandard", "ZstdError"), ("pyarrow", "ArrowException")):
        mod = sys.modules.get(module)  # only a module already used can have raised
        if mod is not None:
            errors.append(getattr(mod, name))
    return tuple(errors)


def _unreadable(path: Path, what: str, e: BaseException) -> PreprocessError:
    return PreprocessError(f"cannot read input {path} as {what}: {_one_line(e)}; supported formats: {SUPPORTED}")


def _arrow_reader(path: Path):
    """``(schema, iterator of (where, record batch))`` of an Arrow IPC file, stream format (what `datasets`
    writes) or file format (pyarrow.ipc.new_file / Feather v2), memory-mapped: batches are read (zero-copy) as
    they are consumed. ``where`` locates the batch for ``_arrow_batch``: ``('file', index)`` or ``('stream',
    byte offset of its message)``; None in a stream with dictionary batches (not readable on their own)."""
    pa = _needs("pyarrow", path, "an Arrow file")
    try:
        source = pa.memory_map(str(path))
        if source.read(6) == b"ARROW1":
            reader = pa.ipc.open_file(source)
            return reader.schema, ((("file", i), reader.get_batch(i)) for i in range(reader.num_record_batches))
        source.seek(0)
        reader = pa.ipc.open_stream(source)
        if any(pa.types.is_dictionary(f.type) for f in reader.schema):
            return reader.schema, ((None, b) for b in reader)
        source.seek(0)
        messages = pa.ipc.MessageReader.open_stream(source)
        schema = pa.ipc.read_schema(messages.read_next_message())
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, "Arrow IPC", e) from None

    def batches():
        while True:
            where = source.tell()
            try:
                message = messages.read_next_message()
            except StopIteration:
                return
            yield ("stream", where), pa.ipc.read_record_batch(message, schema)

    return schema, batches()


def _text_column_type(schema, key: str, path: Path):
    """Checks that ``schema`` has a string column ``key``; one error naming the columns found otherwise."""
    import pyarrow as pa

    if key not in schema.names:
        raise PreprocessError(
            f"{path} has no column {key!r} (columns: {', '.join(schema.names[:12])}); choose "
            f"the text column with --json-key"
        )
    t = schema.field(key).type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
        raise PreprocessError(
            f"{path}: column {key!r} holds {t}, expected strings; choose the text column with --json-key"
        )


def check_inputs(files: Sequence[Path], json_key: str) -> None:
    """Before any tokenizing: every file's format is known and the file opens as that format; parquet and
    Arrow files have a string column ``json_key``. Raises one ``PreprocessError`` naming the file."""
    for path in files:
        fmt, comp = _format(path)
        if fmt is None:
            raise PreprocessError(
                f"input {path}: unknown format (by its name); supported formats: {SUPPORTED} "
                f"(a glob picks the files to read from a directory)"
            )
        if fmt == "parquet":
            pq = _needs("pyarrow.parquet", path, "a parquet file")
            try:
                schema = pq.ParquetFile(str(path)).schema_arrow
            except _read_errors() as e:
                raise _unreadable(path, "parquet", e) from None
            _text_column_type(schema, json_key, path)
        elif fmt == "arrow":
            schema, _ = _arrow_reader(path)
            _text_column_type(schema, json_key, path)
        elif comp is not None:
            try:
                with _open(path, comp) as f:
                    f.read(1)
            except _read_errors() as e:
                raise _unreadable(path, f"{comp}-compressed {fmt}", e) from None


def _column_pieces(col, row: int, task_bytes: int) -> Iterator[tuple]:
    """``(first row, strings)`` pieces of about ``task_bytes`` of a column batch, each compacted (a pickled slice
    would carry its whole parent buffer)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_string_view(col.type):
        col = col.cast(pa.large_string())
    n = len(col)
    ends = np.cumsum(pc.binary_length(col).fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
    start = 0
    while start < n:
        base = ends[start - 1] if start else 0
        end = min(n, int(np.searchsorted(ends, base + task_bytes, side="left")) + 1)
        yield row + start, pa.concat_arrays([col.slice(start, end - start)])
        start = end


def _column_tasks(path: Path, fmt: str, key: str, task_bytes: int) -> Iterator[tuple]:
    """Tasks of a parquet / Arrow file in row order: ``('parquet_group', file, key, (first row, row group))`` or
    ``('arrow_batch', file, key, (first row, where))`` for a row group / record batch with at most GROUP_BYTES
    of text, which the worker reads itself (the main process decoding and sending the strings was most of its
    cost per document: ~8 us for parquet, ~12 us for Arrow per 4.7 KB document), else ``('column', file, key,
    (first row, strings))`` with the strings read here, in pieces of about ``task_bytes``."""
    row = 0
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(str(path))
        md = pf.metadata
        column = [md.schema.column(j).path for j in range(md.num_columns)].index(key)
        for group in range(md.num_row_groups):
            meta = md.row_group(group)
            if meta.column(column).total_uncompressed_size <= GROUP_BYTES:
                yield ("parquet_group", str(path), key, (row, group))
            else:
                for b in pf.iter_batches(
                    batch_size=COLUMN_BATCH_ROWS, row_groups=[group], columns=[key], use_threads=False
                ):
                    for piece in _column_pieces(b.column(0), row, task_bytes):
                        yield ("column", str(path), key, piece)
                    row += b.num_rows
                continue
            row += meta.num_rows
    else:
        import pyarrow as pa

        _, batches = _arrow_reader(path)
        for where, b in batches:
            col = b.column(key)
            if (
                where is not None
                and col.nbytes <= GROUP_BYTES
                and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type))
            ):
                yield ("arrow_batch", str(path), key, (row, where))
            else:
                for piece in _column_pieces(col, row, task_bytes):
                    yield ("column", str(path), key, piece)
            row += b.num_rows


def _line_ranges(path: Path, task_bytes: int) -> Iterator[tuple[int, int]]:
    """Byte ranges ``[start, end)`` of about ``task_bytes`` that end after a newline (or at the file's end).
    The main process only seeks to find them; the workers read the text, so the main process's cost per
    document stays small however many workers tokenize (reading and sending the text through the pool's pipes
    was most of it)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = 0
        while start < size:
            end = pos = start + task_bytes - 1  # the block's last byte, or the newline after it
            f.seek(pos)
            while True:
                block = f.read(1 << 16)
                if not block:
                    end = size
                    break
                i = block.find(b"\n")
                if i >= 0:
                    end = pos + i + 1
                    break
                pos += len(block)
            yield start, end
            start = end


def _line_blocks(f, task_bytes: int) -> Iterator[bytes]:
    """Whole lines of a decompressing stream, about ``task_bytes`` at a time (these the main process reads)."""
    pieces = []
    while True:
        block = f.read(task_bytes)
        if not block:
            break
        cut = block.rfind(b"\n") + 1
        if not cut:  # inside a line longer than a block
            pieces.append(block)
            continue
        pieces.append(memoryview(block)[:cut])  # joined below: copied once
        yield b"".join(pieces)
        pieces = [block[cut:]]
    tail = b"".join(pieces)  # a last line without its newline
    if tail:
        yield tail


def task_bytes_for(files: Sequence[Path], workers: int) -> int:
    """The text bytes of a task: BATCH_BYTES, or less for an input too small to give each worker 8 tasks
    (compressed files count 4x their size, parquet and Arrow files do not count: their groups are the tasks)."""
    if workers <= 1:
        return BATCH_BYTES  # no pool: no tail to balance
    total = 0
    for path in files:
        fmt, comp = _format(path)
        if fmt in ("json", "text"):
            total += path.stat().st_size * (4 if comp else 1)
    return min(BATCH_BYTES, max(MIN_TASK_BYTES, total // (8 * workers)))


def _tasks(files: Sequence[Path], json_key: str, split_lines: bool, task_bytes: int | None = None) -> Iterator[tuple]:
    """Worker tasks ``(fmt, file, json_key, text)`` in input order; a task never spans two files. ``text``:
    ``('range', start, end)``, bytes of an uncompressed file the worker reads itself, or ``('bytes', data)``
    (decompressed here); both whole lines (json / lines) or the whole file (text). Parquet / Arrow: see
    ``_column_tasks``."""
    task_bytes = task_bytes or BATCH_BYTES
    for path in files:
        fmt, comp = _format(path)
        if fmt == "text" and split_lines:
            fmt = "lines"
        try:
            if fmt in ("parquet", "arrow"):
                yield from _column_tasks(path, fmt, json_key, task_bytes)
            elif comp is None and fmt == "text":
                yield ("text", str(path), json_key, ("range", 0, path.stat().st_size))
            elif comp is None:
                for start, end in _line_ranges(path, task_bytes):
                    yield (fmt, str(path), json_key, ("range", start, end))
            else:
                with _open(path, comp) as f:
                    if fmt == "text":
                        yield ("text", str(path), json_key, ("bytes", f.read()))
                    else:
                        for block in _line_blocks(f, task_bytes):
                            yield (fmt, str(path), json_key, ("bytes", block))
        except _read_errors() as e:  # a file corrupt past its start (check_inputs opened every file)
            raise PreprocessError(f"cannot read input {path}: {_one_line(e)}") from None


# ------------------------------------------------------------------------------------------------ workers
_TOKENIZER: Tokenizer | None = None
_APPEND_EOD = True
_DTYPE = np.int32


def _init_worker(tokenizer: Tokenizer, append_eod: bool, dtype=np.int32) -> None:
    global _TOKENIZER, _APPEND_EOD, _DTYPE
    _TOKENIZER, _APPEND_EOD, _DTYPE = tokenizer, append_eod, dtype
    # A worker forked from a training process inherits its SIGTERM handler (record and continue), and
    # Pool.terminate() would then wait for it forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _BadDocument(Exception):
    """A document that cannot be tokenized: ``line`` (counted within the task; the main process, which knows
    where the task starts, names the file's line) and the rest of the message, or ``line`` None and the whole
    message."""

    def __init__(self, line: int | None, message: str):
        super().__init__(message)
        self.line, self.message = line, message


def _task_bytes(path: str, text) -> bytes:
    if text[0] == "range":
        _, start, end = text
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start)
    return text[1]


def _lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    for no, line in enumerate(data.split(b"\n"), 1):
        if line and not line.isspace():  # a blank line is no document
            yield no, line


def _json_texts(data: bytes, key: str) -> Iterator[str]:
    for no, raw in _lines(data):
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise _BadDocument(no, f" is not valid JSON ({_one_line(e)})") from None
        if not isinstance(obj, dict):
            raise _BadDocument(no, f" is a JSON {type(obj).__name__}, expected an object with the text under {key!r}")
        if key not in obj:
            raise _BadDocument(
                no,
                f" has no key {key!r} (keys: {', '.join(map(str, list(obj)[:8]))}); choose the "
                f"text field with --json-key",
            )
        text = obj[key]
        if not isinstance(text, str):
            raise _BadDocument(no, f": {key!r} holds a JSON {type(text).__name__}, expected a string")
        if not text.isascii():  # a JSON "\ud800" escape without its pair decodes to a str no tokenizer takes
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise _BadDocument(
                    no,
                    f": the text holds a lone UTF-16 surrogate (\\u{ord(text[e.start]):04x}, "
                    f"character {e.start}), which no tokenizer can encode; fix or drop that "
                    f"line",
                ) from None
        yield text


def _line_texts(data: bytes) -> Iterator[str]:
    for no, raw in _lines(data):
        try:
            yield raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raise _BadDocument(no, f" is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _file_text(path: str, data: bytes) -> Iterator[str]:
    try:
        yield data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadDocument(None, f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


_OPEN: dict = {}  # the worker's open parquet / Arrow file, the last one only: {path: reader}


def _opened(path: str, open_fn):
    reader = _OPEN.get(path)
    if reader is None:
        _OPEN.clear()
        reader = _OPEN[path] = open_fn(path)
    return reader


def _parquet_group(path: str, key: str, group: int):
    import pyarrow.parquet as pq

    return _opened(path, pq.ParquetFile).read_row_group(group, columns=[key], use_threads=False).column(0)


def _arrow_batch(path: str, key: str, where):
    import pyarrow as pa

    if where[0] == "file":
        return _opened(path, lambda p: pa.ipc.open_file(pa.memory_map(p))).get_batch(where[1]).column(key)

    def open_stream(p):
        source = pa.memory_map(p)
        return source, pa.ipc.open_stream(source).schema

    source, schema = _opened(path, open_stream)
    source.seek(where[1])
    return pa.ipc.read_record_batch(pa.ipc.read_message(source), schema).column(key)


def _column_texts(path: str, key: str, payload) -> Iterator[str]:
    first, strings = payload
    try:
        texts = strings.to_pylist()
    except UnicodeDecodeError as e:  # parquet does not validate UTF-8 on write
        raise _BadDocument(
            None,
            f"{path} rows {first}-{first + len(strings) - 1} (from 0): column {key!r} holds invalid UTF-8 ({e.reason})",
        ) from None
    for i, text in enumerate(texts, first):
        if text is None:
            raise _BadDocument(
                None, f"{path} row {i} (from 0): column {key!r} is null, expected a string; fill or drop that row"
            )
        yield text


def _encode_task(task) -> tuple:
    """-> ``('ok', tokens (1-D array of all documents, in the output's dtype), lengths, n_empty, min id, max id,
    newlines)`` or ``('error', line within the task or None, message)``; ``newlines``: how many lines the task
    held (line formats), so that the main process numbers the next task's lines."""
    fmt, path, key, payload = task
    tok, eod, append_eod = _TOKENIZER, _TOKENIZER.eod, _APPEND_EOD
    newlines = 0
    try:
        if fmt == "column":
            texts = _column_texts(path, key, payload)
        elif fmt in ("parquet_group", "arrow_batch"):
            first, where = payload
            try:
                strings = (_parquet_group if fmt == "parquet_group" else _arrow_batch)(path, key, where)
            except _read_errors() as e:
                return ("error", None, f"cannot read input {path}: {_one_line(e)}")
            texts = _column_texts(path, key, (first, strings))
        else:
            try:
                data = _task_bytes(path, payload)
            except OSError as e:
                return ("error", None, f"cannot read input {path}: {_one_line(e)}")
            if fmt == "text":
                texts = _file_text(path, data)
            else:
                newlines = data.count(b"\n")
                texts = _json_texts(data, key) if fmt == "json" else _line_texts(data)
        parts, lengths, empty = [], [], 0
        for text in texts:
            if not text or text.isspace():  # == not text.strip(), without copying the text
                empty += 1
                continue
            ids = tok.encode(text)
            if not ids:
                empty += 1
                continue
            if append_eod:
                ids.append(eod)
            # At once, in the output's dtype: the list and its int objects are freed while still in cache (a
            # task's lists kept until its end cost ~5% of the tokenizer's rate), and uint16 halves what is sent.
            parts.append(np.array(ids, dtype=_DTYPE))
            lengths.append(len(ids))
    except _BadDocument as e:
        return ("error", e.line, e.message)
    except OverflowError:  # an id that does not fit the dtype (negative, or >= 2**16 for uint16)
        return ("error", None, f"{path}: the tokenizer produced ids outside [0, {tok.vocab_size})")
    if not parts:
        return ("ok", np.zeros(0, _DTYPE), [], empty, None, None, newlines)
    flat = np.concatenate(parts)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= tok.vocab_size:
        return ("error", None, f"{path}: the tokenizer produced ids outside [0, {tok.vocab_size})")
    return ("ok", flat, lengths, empty, lo, hi, newlines)


# ----------------------------------------------------------------------------------------------- preprocess
def _prefix(output_prefix) -> str:
    s = str(output_prefix)
    for suffix in (".bin", ".idx", ".json"):
        if s.endswith(suffix):
            return s[: -len(suffix)]
    return s


class _Pool(multiprocessing.pool.Pool):
    """The stock pool, except that its worker-maintenance thread does not wake on results: it woke whenever a
    result waited in the result pipe and spun while the result thread read it, about half of the main
    process's CPU per document (measured). It still wakes when a worker exits or the pool closes or drains."""

    def _get_sentinels(self):
        return [self._change_notifier._reader]


def _results(tasks: Iterable[tuple], tokenizer: Tokenizer, workers: int, append_eod: bool, dtype=np.int32):
    """``(task's file, encoded task)`` in input order; at most a few tasks per worker are in flight (bounded
    memory)."""
    if workers <= 1:
        _init_worker(tokenizer, append_eod, dtype)
        for task in tasks:
            yield task[1], _encode_task(task)
        return
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = _Pool(workers, initializer=_init_worker, initargs=(tokenizer, append_eod, dtype), context=ctx)
    interrupted = False
    try:
        pending = collections.deque()
        for task in tasks:
            pending.append((task[1], pool.apply_async(_encode_task, (task,))))
            if len(pending) >= 4 * workers:
                path, result = pending.popleft()
                yield path, result.get()
        while pending:
            path, result = pending.popleft()
            yield path, result.get()
    except KeyboardInterrupt:
        interrupted = True
        pool.terminate()  # Ctrl-C: stop now
        raise
    finally:
        if not interrupted:
            # Also after an error: let the few tasks in flight (at most 4 per worker) finish and the workers exit.
            # Pool.terminate() kills workers that may be mid-transfer on its queues, and its own teardown can then
            # wait forever (seen once in 899 s of a test on a loaded machine).
            pool.close()
        pool.join()


def _add_documents(builder, flat: np.ndarray, lengths: list[int]) -> None:
    """``builder.add_document(doc, [len(doc)])`` for each document of ``flat`` (the same .bin and .idx; a test
    compares), for a whole task at once: one add_document call per document was the main process's largest
    cost per document once the workers tokenize."""
    if flat.dtype != np.dtype(builder.dtype):
        raise AssertionError(f"tokens in {flat.dtype}, the builder writes {np.dtype(builder.dtype)}")
    builder.data_file.write(memoryview(flat))
    n0 = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(lengths)
    builder.document_indices.extend(range(n0 + 1, n0 + len(lengths) + 1))


def preprocess(
    inputs: Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    tokenizer_path: str | os.PathLike | Tokenizer,
    json_key: str = "text",
    workers: int = 2,
    force: bool = False,
    append_eod: bool = True,
    log_every: float = 1.0,
    split_lines: bool = False,
    eod_token: str | int | None = None,
    quiet: bool = True,
    stream=None,
) -> dict:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx/.json`` (see the module docstring); return the metadata.

    ``tokenizer_path`` may also be a loaded ``Tokenizer``. ``log_every``: seconds between updates of the progress
    bar on ``stream`` (stderr; a bar only on a terminal), which with the summary line is shown unless ``quiet``.
    Raises ``PreprocessError`` / ``TokenizerError`` (both
    ``ValueError``) for unusable inputs, tokenizer or output."""
    if workers < 1:
        raise PreprocessError(f"workers must be >= 1, got {workers}")
    files = expand_inputs(inputs)
    tokenizer = (
        tokenizer_path if isinstance(tokenizer_path, Tokenizer) else load_tokenizer(tokenizer_path, eod_token=eod_token)
    )
    prefix = _prefix(output_prefix)
    outputs = {ext: prefix + ext for ext in (".bin", ".idx", ".json")}
    for out in outputs.values():  # before the --force check: --force must not be suggested for these
        hit = path_overlap(out, [*files, getattr(tokenizer, "path", None)])
        if hit:
            raise PreprocessError(
                f"output {out} {hit[0]} the input {hit[1]}: writing it would destroy that input "
                "(even with --force); choose an --output-prefix whose .bin/.idx/.json are not inputs"
            )
    existing = [p for ext, p in outputs.items() if ext != ".json" and os.path.exists(p)]
    if existing and not force:
        raise PreprocessError(
            f"output {' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
            f"pass --force (force=True) to overwrite"
        )
    if not files:
        raise PreprocessError("empty input: the inputs name no file (empty directories?)")
    check_inputs(files, json_key)  # an unknown, unreadable or column-less file fails now, not hours in
    parent = os.path.dirname(prefix)
    if parent:
        os.makedirs(parent, exist_ok=True)
    # megatron-core takes seconds to import: only once the cheap checks have passed, and off the clock
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_slm.data.datasets import file_sha256

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    tmp = {ext: f"{p}.partial-{os.getpid()}" for ext, p in outputs.items()}
    stream = sys.stderr if stream is None else stream
    t0 = time.perf_counter()
    bar = progress_bar(
        desc="tokenizing", unit=" docs", unit_scale=True, file=stream, quiet=quiet, mininterval=log_every, leave=False
    )
    docs = tokens = empty = 0
    lo, hi = None, None  # the range of the token ids written
    done = False
    builder = None
    tasks = _tasks(files, json_key, split_lines, task_bytes_for(files, workers))
    results = _results(tasks, tokenizer, workers, append_eod, dtype)
    path, line_base = None, 0  # lines before the current task in its file
    try:
        for task_path, result in results:
            if task_path != path:
                path, line_base = task_path, 0
            if result[0] == "error":
                _, line, message = result
                raise PreprocessError(message if line is None else f"{path} line {line_base + line}{message}")
            _, flat, lengths, n_empty, rlo, rhi, newlines = result
            line_base += newlines
            if lengths:
                if builder is None:
                    builder = IndexedDatasetBuilder(tmp[".bin"], dtype=dtype)
                _add_documents(builder, flat, lengths)
                lo = rlo if lo is None else min(lo, rlo)
                hi = rhi if hi is None else max(hi, rhi)
            docs += len(lengths)
            tokens += int(flat.size)
            empty += n_empty
            bar.set_postfix_str(f"{tokens:,} tokens", refresh=False)
            bar.update(len(lengths))
        if docs == 0:
            raise PreprocessError(
                f"empty input: {len(files)} file(s) hold no non-empty document ({empty} empty skipped)"
            )
        builder.finalize(tmp[".idx"])
        bin_stat = os.stat(tmp[".bin"])  # the rename below keeps size and mtime
        elapsed = time.perf_counter() - t0
        meta = {
            "format": "megatron-core indexed dataset",
            "tool": TOOL,
            "tool_version": TOOL_VERSION,
            **tokenizer.describe(),
            "append_eod": bool(append_eod),
            "dtype": np.dtype(dtype).name,
            "num_documents": docs,
            "num_tokens": tokens,
            "num_empty_skipped": empty,
            "inputs": [str(f) for f in files],
            "json_key": json_key,
            "split_lines": bool(split_lines),
            "idx_sha256": file_sha256(tmp[".idx"]),
            "bin_bytes": bin_stat.st_size,
            "min_token_id": lo,
            "max_token_id": hi,
            "token_ids_bin": {"bytes": bin_stat.st_size, "mtime_ns": bin_stat.st_mtime_ns},
        }
        with open(tmp[".json"], "w") as f:
            f.write(json.dumps(meta, indent=1) + "\n")
        # The .idx is what makes a prefix look complete (IndexedDataset.exists): drop the old one first,
        # put it in place last.
        if os.path.exists(outputs[".idx"]):
            os.remove(outputs[".idx"])
        os.replace(tmp[".bin"], outputs[".bin"])
        os.replace(tmp[".json"], outputs[".json"])
        os.replace(tmp[".idx"], outputs[".idx"])
        done = True
    finally:
        bar.close()
        results.close()  # stops the worker pool
        if not done:
            if builder is not None:
                builder.data_file.close()
            for p in tmp.values():
                if os.path.exists(p):
                    os.remove(p)
    if not quiet:
        print(
            f"done: {docs:,} documents ({empty:,} empty skipped), {tokens:,} tokens in {elapsed:.2f} s: "
            f"{docs / max(elapsed, 1e-9):,.0f} docs/s, {tokens / max(elapsed, 1e-9):,.0f} tokens/s "
            f"-> {prefix}.bin/.idx ({np.dtype(dtype).name})",
            file=stream,
            flush=True,
        )
    meta_out = dict(meta)
    meta_out["seconds"] = elapsed
    return meta_out
