"""Tokenize raw text into a megatron-core indexed dataset (``<prefix>.bin`` / ``<prefix>.idx``) + ``<prefix>.json``.

Inputs are files, directories (every non-hidden file below, recursively, in sorted order) or globs:

    *.jsonl, *.json   one JSON object per line, the document's text under ``json_key`` (blank lines skipped)
    anything else     UTF-8 text: the whole file is one document, or with ``split_lines`` each non-empty line
    (a ``.gz`` suffix is read through gzip and classified by the suffix before it)

Documents are tokenized in ``workers`` processes over batches, collected strictly in input order (so the
output does not depend on the number of workers), each followed by the tokenizer's EOD id. Documents whose
text is empty or blank are skipped and counted. One document = one sequence = one ``add_document`` of
``IndexedDatasetBuilder``; the token dtype is ``DType.optimal_dtype(vocab_size)`` (uint16 below 65500).

``<prefix>.json`` records the tokenizer (path, kind, sha256 fingerprint, vocab size, EOD), the counts, the
dtype, the inputs, the .idx's sha256, the .bin's size and the range of its token ids (``min_token_id``,
``max_token_id``, valid for the .bin's size and mtime in ``token_ids_bin``; training rescans a .bin that
changed). A JSON line whose text holds a lone UTF-16 surrogate (``"\\ud800"``), which no tokenizer can
encode, is refused naming its file and line. Everything is written under temporary names and
renamed at the end (the .idx last), so an interrupted run never leaves a complete-looking output.

    python tools/preprocess_data.py data/*.jsonl --tokenizer tokenizer.model --output-prefix data/train
"""
import argparse
import collections
import glob
import gzip
import itertools
import json
import multiprocessing
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from megatron_slm.data.tokenizer import Tokenizer, load_tokenizer
from megatron_slm.errors import PreprocessError, TokenizerError

TOOL = "megatron_slm preprocess_data"
TOOL_VERSION = "1"
JSON_SUFFIXES = (".jsonl", ".json")
BATCH_DOCS = 256            # documents per worker task at most
BATCH_BYTES = 1 << 20       # raw bytes per worker task at most (a single larger document is its own task)




# ------------------------------------------------------------------------------------------------ inputs
def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def expand_inputs(inputs: Sequence[Union[str, os.PathLike]]) -> List[Path]:
    """Files named by ``inputs`` (files, directories searched recursively, globs), in order, each once."""
    if not inputs:
        raise PreprocessError("no inputs given; name one or more .jsonl/.json/text files, directories or globs")
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
            for f in sorted(q for q in p.rglob("*") if q.is_file() and not _is_hidden(q, p)):
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
                    for f in sorted(q for q in mp.rglob("*") if q.is_file() and not _is_hidden(q, mp)):
                        add(f)
        else:
            raise PreprocessError(f"input {s} does not exist")
    return files


def path_overlap(output: Union[str, os.PathLike],
                 inputs: Iterable[Union[str, os.PathLike, None]]) -> Optional[Tuple[str, str]]:
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


def _format(path: Path) -> Tuple[str, bool]:
    """('json' | 'text', gzipped)."""
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    inner = suffixes[-2] if gz and len(suffixes) >= 2 else (suffixes[-1] if suffixes and not gz else "")
    return ("json" if inner in JSON_SUFFIXES else "text"), gz


def _open(path: Path, gz: bool):
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _tasks(files: Sequence[Path], json_key: str, split_lines: bool) -> Iterator[tuple]:
    """Worker tasks ``(fmt, file, json_key, [(line_no, raw_bytes), ...])``; a task never spans two files."""
    for path in files:
        fmt, gz = _format(path)
        if fmt == "text" and split_lines:
            fmt = "lines"
        try:
            with _open(path, gz) as f:
                if fmt == "text" and not split_lines:
                    yield ("text", str(path), json_key, [(0, f.read())])
                    continue
                batch, size = [], 0
                for no, line in enumerate(f, 1):
                    if not line.strip():
                        continue  # a blank line is no document
                    batch.append((no, line))
                    size += len(line)
                    if len(batch) >= BATCH_DOCS or size >= BATCH_BYTES:
                        yield (fmt, str(path), json_key, batch)
                        batch, size = [], 0
                if batch:
                    yield (fmt, str(path), json_key, batch)
        except (OSError, EOFError) as e:
            raise PreprocessError(f"cannot read input {path}: {e}") from None


# ------------------------------------------------------------------------------------------------ workers
_TOKENIZER: Optional[Tokenizer] = None
_APPEND_EOD = True


def _init_worker(tokenizer: Tokenizer, append_eod: bool) -> None:
    global _TOKENIZER, _APPEND_EOD
    _TOKENIZER, _APPEND_EOD = tokenizer, append_eod
    # A worker forked from a training process inherits its SIGTERM handler (record and continue), and
    # Pool.terminate() would then wait for it forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _encode_task(task) -> tuple:
    """-> ('ok', tokens (1-D array of all documents), lengths, n_empty) or ('error', message)."""
    fmt, path, key, records = task
    tok, eod = _TOKENIZER, _TOKENIZER.eod
    parts, lengths, empty = [], [], 0
    for no, raw in records:
        where = f"{path}" if fmt == "text" else f"{path} line {no}"
        try:
            if fmt == "json":
                try:
                    obj = json.loads(raw)
                except ValueError as e:
                    return ("error", f"{where} is not valid JSON ({str(e).splitlines()[0]})")
                if not isinstance(obj, dict):
                    return ("error", f"{where} is a JSON {type(obj).__name__}, expected an object "
                                     f"with the text under {key!r}")
                if key not in obj:
                    return ("error", f"{where} has no key {key!r} (keys: {', '.join(map(str, list(obj)[:8]))}); "
                                     f"choose the text field with --json-key")
                text = obj[key]
                if not isinstance(text, str):
                    return ("error", f"{where}: {key!r} holds a JSON {type(text).__name__}, expected a string")
            else:
                text = raw.decode("utf-8")
                if fmt == "lines":
                    text = text.rstrip("\r\n")
        except UnicodeDecodeError as e:
            return ("error", f"{where} is not UTF-8 text ({e.reason} at byte {e.start})")
        if not text.isascii():  # a JSON "\ud800" escape without its pair decodes to a str no tokenizer takes
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                return ("error", f"{where}: the text holds a lone UTF-16 surrogate (\\u{ord(text[e.start]):04x}, "
                                 f"character {e.start}), which no tokenizer can encode; fix or drop that line")
        if not text.strip():
            empty += 1
            continue
        ids = tok.encode(text)
        if not ids:
            empty += 1
            continue
        if _APPEND_EOD:
            ids.append(eod)
        parts.append(ids)
        lengths.append(len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int64, count=sum(lengths))
    if flat.size and (flat.min() < 0 or flat.max() >= tok.vocab_size):
        return ("error", f"{path}: the tokenizer produced ids outside [0, {tok.vocab_size})")
    return ("ok", flat.astype(np.int32), lengths, empty)


# ----------------------------------------------------------------------------------------------- progress
class _Progress:
    def __init__(self, quiet: bool, every: float, stream=None):
        self.quiet, self.every, self.stream = quiet, every, stream or sys.stderr
        self.t0 = self.last = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.shown = False

    def _line(self, docs: int, tokens: int) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return (f"{docs:,} docs, {tokens:,} tokens | {docs / dt:,.0f} docs/s, {tokens / dt:,.0f} tokens/s | "
                f"{dt:.1f} s")

    def update(self, docs: int, tokens: int) -> None:
        now = time.perf_counter()
        if self.quiet or now - self.last < self.every:
            return
        self.last = now
        if self.tty:
            self.stream.write("\r\033[K" + self._line(docs, tokens))
        else:
            self.stream.write(self._line(docs, tokens) + "\n")
        self.stream.flush()
        self.shown = True

    def done(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty and self.shown:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()


# ----------------------------------------------------------------------------------------------- preprocess
def _prefix(output_prefix) -> str:
    s = str(output_prefix)
    for suffix in (".bin", ".idx", ".json"):
        if s.endswith(suffix):
            return s[: -len(suffix)]
    return s


def _results(tasks: Iterable[tuple], tokenizer: Tokenizer, workers: int, append_eod: bool):
    """Encoded tasks in input order; at most a few tasks per worker are in flight (bounded memory)."""
    if workers <= 1:
        _init_worker(tokenizer, append_eod)
        for task in tasks:
            yield _encode_task(task)
        return
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, append_eod))
    try:
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(_encode_task, (task,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def preprocess(inputs: Sequence[Union[str, os.PathLike]], output_prefix: Union[str, os.PathLike],
               tokenizer_path: Union[str, os.PathLike, Tokenizer], json_key: str = "text", workers: int = 2,
               force: bool = False, append_eod: bool = True, log_every: float = 1.0, split_lines: bool = False,
               eod_token: Optional[Union[str, int]] = None, quiet: bool = True, stream=None) -> dict:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx/.json`` (see the module docstring); return the metadata.

    ``tokenizer_path`` may also be a loaded ``Tokenizer``. ``log_every``: seconds between progress lines on
    ``stream`` (stderr), shown unless ``quiet``. Raises ``PreprocessError`` / ``TokenizerError`` (both
    ``ValueError``) for unusable inputs, tokenizer or output."""
    if workers < 1:
        raise PreprocessError(f"workers must be >= 1, got {workers}")
    files = expand_inputs(inputs)
    tokenizer = tokenizer_path if isinstance(tokenizer_path, Tokenizer) else load_tokenizer(tokenizer_path,
                                                                                            eod_token=eod_token)
    prefix = _prefix(output_prefix)
    outputs = {ext: prefix + ext for ext in (".bin", ".idx", ".json")}
    for out in outputs.values():  # before the --force check: --force must not be suggested for these
        hit = path_overlap(out, [*files, getattr(tokenizer, "path", None)])
        if hit:
            raise PreprocessError(f"output {out} {hit[0]} the input {hit[1]}: writing it would destroy that input "
                                  "(even with --force); choose an --output-prefix whose .bin/.idx/.json are not inputs")
    existing = [p for ext, p in outputs.items() if ext != ".json" and os.path.exists(p)]
    if existing and not force:
        raise PreprocessError(f"output {' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                              f"pass --force (force=True) to overwrite")
    if not files:
        raise PreprocessError("empty input: the inputs name no file (empty directories?)")
    parent = os.path.dirname(prefix)
    if parent:
        os.makedirs(parent, exist_ok=True)
    # megatron-core takes seconds to import: only once the cheap checks have passed, and off the clock
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_slm.data.datasets import file_sha256

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    tmp = {ext: f"{p}.partial-{os.getpid()}" for ext, p in outputs.items()}
    progress = _Progress(quiet, log_every, stream)
    docs = tokens = empty = 0
    lo, hi = None, None  # the range of the token ids written
    done = False
    builder = None
    results = _results(_tasks(files, json_key, split_lines), tokenizer, workers, append_eod)
    try:
        for result in results:
            if result[0] == "error":
                raise PreprocessError(result[1])
            _, flat, lengths, n_empty = result
            if builder is None and lengths:
                builder = IndexedDatasetBuilder(tmp[".bin"], dtype=dtype)
            start = 0
            for n in lengths:
                builder.add_document(flat[start:start + n], [n])
                start += n
            if flat.size:
                lo = int(flat.min()) if lo is None else min(lo, int(flat.min()))
                hi = int(flat.max()) if hi is None else max(hi, int(flat.max()))
            docs += len(lengths)
            tokens += int(flat.size)
            empty += n_empty
            progress.update(docs, tokens)
        if docs == 0:
            raise PreprocessError(f"empty input: {len(files)} file(s) hold no non-empty document "
                                  f"({empty} empty skipped)")
        builder.finalize(tmp[".idx"])
        bin_stat = os.stat(tmp[".bin"])  # the rename below keeps size and mtime
        elapsed = time.perf_counter() - progress.t0
        meta = {"format": "megatron-core indexed dataset", "tool": TOOL, "tool_version": TOOL_VERSION,
                **tokenizer.describe(), "append_eod": bool(append_eod), "dtype": np.dtype(dtype).name,
                "num_documents": docs, "num_tokens": tokens, "num_empty_skipped": empty,
                "inputs": [str(f) for f in files], "json_key": json_key, "split_lines": bool(split_lines),
                "idx_sha256": file_sha256(tmp[".idx"]), "bin_bytes": bin_stat.st_size,
                "min_token_id": lo, "max_token_id": hi,
                "token_ids_bin": {"bytes": bin_stat.st_size, "mtime_ns": bin_stat.st_mtime_ns}}
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
        results.close()  # stops the worker pool
        if not done:
            if builder is not None:
                builder.data_file.close()
            for p in tmp.values():
                if os.path.exists(p):
                    os.remove(p)
    progress.done(f"done: {docs:,} documents ({empty:,} empty skipped), {tokens:,} tokens in {elapsed:.2f} s: "
                  f"{docs / max(elapsed, 1e-9):,.0f} docs/s, {tokens / max(elapsed, 1e-9):,.0f} tokens/s "
                  f"-> {prefix}.bin/.idx ({np.dtype(dtype).name})")
    meta_out = dict(meta)
    meta_out["seconds"] = elapsed
    return meta_out


# ----------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize .jsonl/.json/text files into a megatron-core indexed dataset "
                    "(<prefix>.bin/.idx) plus <prefix>.json metadata.")
    p.add_argument("inputs", nargs="*", help="input files, directories (recursive) or globs")
    p.add_argument("--input", action="append", default=[], metavar="PATH",
                   help="another input (repeatable; same as a positional input)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx and PREFIX.json")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="a sentencepiece .model or a Hugging Face tokenizer.json")
    p.add_argument("--eod-token", default=None,
                   help="token (or id) appended after each document; default: the tokenizer's eos")
    p.add_argument("--json-key", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--split-lines", action="store_true",
                   help="text files: each non-empty line is a document (default: each file is one document)")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes (default: 2)")
    p.add_argument("--no-append-eod", dest="append_eod", action="store_false",
                   help="do not append the EOD id after each document")
    p.add_argument("--force", action="store_true", help="overwrite an existing PREFIX.bin/.idx (never an input)")
    p.add_argument("--log-every", type=float, default=1.0, help="seconds between progress updates (default: 1)")
    p.add_argument("--quiet", action="store_true", help="no progress or summary on stderr")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    try:
        preprocess(list(args.inputs) + list(args.input), args.output_prefix, args.tokenizer,
                   json_key=args.json_key, workers=args.workers, force=args.force, append_eod=args.append_eod,
                   log_every=args.log_every, split_lines=args.split_lines, eod_token=args.eod_token,
                   quiet=args.quiet)
    except (PreprocessError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
