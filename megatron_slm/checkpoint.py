"""Checkpoints through megatron-core dist_checkpointing: any TP/PP layout loads any other.

Two kinds, one format:
- model weights (``save_model_weights``): dist_checkpointing shards + ``slm_model.json`` (the ModelConfig);
- training checkpoints (``save_training_checkpoint``): ``<root>/iter_0000100/`` with model *and* optimizer
  shards, ``trainer_state.json`` (iteration = data position, LR schedule, config) and ``rank_state/``
  (RNG streams and selection state per rank), plus ``slm_model.json`` so it is also a weights checkpoint.
  ``<root>/latest_checkpointed_iteration.txt`` names the newest complete one; older ones beyond
  ``keep_last`` are deleted.

Every checkpoint is written to ``<dir>.tmp``; the ranks agree that every write succeeded (else all raise
one CheckpointError and the partial ``.tmp`` is removed), the files and directories are fsynced, then it is
renamed into place and only then ``latest`` is replaced (written to a temporary file, fsynced, renamed): a
half-written checkpoint is never taken as the latest, also after a power loss. Re-saving an existing
iteration swaps the new directory in atomically (Linux ``renameat2(RENAME_EXCHANGE)``); where the filesystem
lacks that, the old one is renamed aside to ``<dir>.old`` first, readers fall back to it while the final
name is missing, and the next start restores it. With ``--deepspeed`` the engine's own files (exact resume)
go into the same ``iter_NNNNNNN.tmp`` together with dist_checkpointing model shards and ``slm_model.json``,
so a DeepSpeed iteration is a weights checkpoint as well. A directory that holds a ``latest`` file can be
passed wherever a checkpoint is expected (``--load``, ``--ref-load``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import pickle
import re
import shutil
import sys
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_slm.errors import CheckpointError
from megatron_slm.log import get_logger

MODEL_META = "slm_model.json"
TRAINER_STATE = "trainer_state.json"
LATEST = "latest_checkpointed_iteration.txt"
TMP, OLD = ".tmp", ".old"  # a checkpoint being written; the previous copy of a re-saved one (moved aside)

log = get_logger(__name__)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def iteration_dirs(root: str | Path) -> list[Path]:
    """The complete iteration checkpoints directly under a training root (not ``.tmp``/``.old``), oldest first."""
    found = [(int(p.name[5:]), p) for p in Path(root).glob("iter_*")
             if re.fullmatch(r"iter_\d{7,}", p.name) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_iteration(root: str | Path) -> int | None:
    """The newest complete training checkpoint under ``root``, or None if there is none."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number; delete it or restore it")
    return int(text)


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def resolve(directory: str | Path) -> Path:
    """A checkpoint directory, or a training root with a ``latest`` file -> its newest iteration.

    While a re-save of that iteration is between moving the old copy aside and renaming the new one in (only
    where the filesystem cannot swap directories atomically), the old copy ``iter_N.old`` is the answer."""
    path = Path(directory)
    it = latest_iteration(path) if path.is_dir() else None
    if it is None:
        return path
    final = iteration_dir(path, it)
    if final.is_dir():
        return final
    if _sibling(final, OLD).is_dir():
        return _sibling(final, OLD)
    found = [p.name for p in iteration_dirs(path)]
    raise CheckpointError(
        f"{path / LATEST} names iteration {it} but {final} is missing; restore it or point latest at an existing "
        f"iteration (found: {', '.join(found) or 'none'})"
    )


def _fsync(path: str | Path) -> None:
    is_dir = os.path.isdir(path)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if is_dir else 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a directory (their renames are durable anyway)
        if not (is_dir and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory bottom-up, ``root`` itself last."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(os.path.join(dirpath, name))
        _fsync(dirpath)


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` all at once and durably: temporary file, fsync, rename, fsync the directory."""
    path = Path(path)
    tmp = _sibling(path, TMP)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


_RENAMEAT2 = []  # [libc.renameat2 or None], looked up once


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the filesystem (NFS, Lustre, ...) cannot, so that the caller falls back to two renames."""
    if not _RENAMEAT2:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            except (OSError, AttributeError):
                fn = None
        _RENAMEAT2.append(fn)
    fn = _RENAMEAT2[0]
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _recover(final: Path) -> None:
    """Finish what an interrupted re-save of ``final`` left (rank 0, under the save lock): restore ``final``
    from ``final.old`` if it is missing, else drop the old copy."""
    old = _sibling(final, OLD)
    if not old.is_dir():
        return
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(old, final)
        _fsync(final.parent)
        log.warning(f"restored {final} from {old.name}: a re-save of it was interrupted")


def recover(root: str | Path) -> None:
    """Clean up after interrupted saves under a training root (rank 0, under the save lock): restore
    iterations moved aside (``iter_N.old``) whose final directory is missing, remove partial ``iter_N.tmp``."""
    root = Path(root)
    if not root.is_dir():
        return
    for old in sorted(root.glob(f"iter_???????{OLD}")):
        _recover(old.with_suffix(""))
    for tmp in sorted(root.glob(f"iter_???????{TMP}")):
        shutil.rmtree(tmp, ignore_errors=True)


def _commit(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final`` so that a complete ``final`` (or, for a moment, its ``.old``
    copy, which ``resolve`` and ``recover`` use) exists at every instant."""
    if not final.exists():
        os.rename(tmp, final)
    elif _exchange(tmp, final):  # tmp now holds the previous copy
        _fsync(final.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    else:
        old = _sibling(final, OLD)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except Exception:
            os.rename(old, final)
            raise
        _fsync(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    _fsync(final.parent)


def _describe(exc: BaseException) -> str:
    """One line for an exception, unwrapping torch DCP's CheckpointException (per-rank failures)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        return "; ".join(dict.fromkeys(_describe(e) for e in inner))
    cause = exc
    while cause.__cause__ is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return f"{cause.strerror}: {cause.filename}" if cause.filename else cause.strerror
    text = str(exc).strip().splitlines()
    oserror = re.search(r"\[Errno \d+\] (.+)", text[0]) if text else None  # one that crossed a process boundary
    if oserror:
        return oserror.group(1).replace("'", "")[:200]
    return f"{type(exc).__name__}: {text[0].split('. ')[0][:200]}" if text else type(exc).__name__


def _local_failures(exc: BaseException) -> list[str]:
    """"rank R: what" lines for an exception raised on this rank. torch DCP's CheckpointException carries the
    failures of every rank (on the coordinator; elsewhere it is empty: another rank reports them)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        return [f"rank {r}: {_describe(f[0] if isinstance(f, tuple) else f)}" for r, f in sorted(failures.items())]
    return [f"rank {_rank()}: {_describe(exc)}"]


def _agreed_failures(failed: bool, failures: list[str]) -> list[str]:
    """Every rank calls this after a step that may have failed on some ranks (``failed``; ``failures``: this
    rank's "rank R: ..." lines). Returns every rank's lines, the same list on every rank; empty when all
    succeeded."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        from megatron_slm.parallel.distributed import device

        flag = torch.tensor([1.0 if failed else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0:
            return []
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, failures)
        failures = [line for lines in gathered for line in lines]
    elif not failed:
        return []
    return list(dict.fromkeys(failures)) or ["a rank failed without a reason"]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _save_failed(final: Path, failures: list[str]) -> CheckpointError:
    root = final.parent
    try:
        free = f"{_human(shutil.disk_usage(root).free)} free in {root}"
    except OSError:
        free = f"free space in {root} unknown"
    try:
        it = latest_iteration(root)
    except CheckpointError:
        it = None
    kept = (f"{root / LATEST} still names iteration {it}, unchanged" if it is not None and (root / LATEST).is_file()
            else "nothing else was changed")
    return CheckpointError(
        f"could not write checkpoint {final} ({'; '.join(failures[:4])}{' ...' if len(failures) > 4 else ''}); {free}; "
        f"the partial {final.name}{TMP} was removed and {kept}; free disk space or choose another --save"
    )


def _step(fn, final: Path) -> None:
    """Run one step of a save on this rank (``fn`` may be None: nothing to do here), then agree with every rank;
    if any failed: remove the partial ``.tmp`` (rank 0) and raise the same CheckpointError on every rank."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    failed, local = False, []
    try:
        if fn is not None:
            fn()
    except (Exception, CheckpointException) as exc:
        failed, local = True, _local_failures(exc)
    failures = _agreed_failures(failed, local)
    if failures:
        if _rank() == 0:
            shutil.rmtree(_sibling(final, TMP), ignore_errors=True)
        _barrier()
        raise _save_failed(final, failures)


def _save(sharded_state: dict, final: Path, write_files, on_commit=None) -> None:
    """dist_checkpointing.save into ``final.tmp``, extra files via ``write_files(tmp)`` (every rank), agree,
    fsync, rename into place, then ``on_commit()`` (rank 0; e.g. replace ``latest``). One CheckpointError on
    every rank if any step fails anywhere; the partial ``.tmp`` is removed and nothing else changes."""
    from megatron.core import dist_checkpointing

    tmp = _sibling(final, TMP)
    rank0 = _rank() == 0

    def prepare():
        _recover(final)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def write():
        dist_checkpointing.save(sharded_state, str(tmp))
        write_files(tmp)

    def commit():
        _commit(tmp, final)
        if on_commit is not None:
            on_commit()

    _step(prepare if rank0 else None, final)
    _step(write, final)
    # One process per node flushes every file (each node's page cache holds what its ranks wrote).
    _step((lambda: _fsync_tree(tmp)) if int(os.environ.get("LOCAL_RANK", _rank())) == 0 else None, final)
    _step(commit if rank0 else None, final)


# The fields that decide what a checkpoint's weights compute (their shapes and the model's function):
# loading under other values is refused, or they are taken from the checkpoint (training/run.py).
ARCH_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "vocab_size", "rotary_base", "norm_epsilon", "untie_embeddings_and_output_weights", "sliding_window")


def _model_meta_text(model_cfg, tokenizer_fingerprints=()) -> str:
    """slm_model.json: the model config and the fingerprints (sha256 of the file) of the tokenizer it reads."""
    return json.dumps({"model": dataclasses.asdict(model_cfg),
                       "tokenizer": {"fingerprints": sorted(set(tokenizer_fingerprints))}}, indent=2)


def model_sharded_state_dict(model) -> dict:
    """A GPTModel's sharded state dict; for the chunks of an interleaved pipeline (a list) the union of theirs.

    The chunks' dicts go under "model0", "model1", ... (as Megatron-LM): their local keys repeat, but the shards'
    keys are global (layer numbers of the whole model), so the files are those of any other layout."""
    if isinstance(model, (list, tuple)):
        if len(model) == 1:
            return model[0].sharded_state_dict()
        return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model)}
    return model.sharded_state_dict()


def load_model_state(model, state: dict) -> None:
    """``load_state_dict`` of a loaded ``model_sharded_state_dict`` (a GPTModel or a list of chunks)."""
    if isinstance(model, (list, tuple)) and len(model) > 1:
        for i, chunk in enumerate(model):
            chunk.load_state_dict(state[f"model{i}"])
    else:
        (model[0] if isinstance(model, (list, tuple)) else model).load_state_dict(state)


def save_model_weights(model, directory: str, model_cfg, tokenizer_fingerprints=()) -> None:
    """``model``: a GPTModel or the list of this rank's chunks of an interleaved pipeline."""
    def write(tmp):
        if _rank() == 0:
            (tmp / MODEL_META).write_text(_model_meta_text(model_cfg, tokenizer_fingerprints))

    _save(model_sharded_state_dict(model), Path(directory), write)


def read_model_meta(directory: str) -> dict:
    path = resolve(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory '{directory}' does not exist; check the path")
    if not (path / MODEL_META).is_file() or not (path / "metadata.json").is_file():
        hint = " (an interrupted save left it; delete it and save again)" if path.name.endswith(".tmp") else ""
        raise CheckpointError(f"'{path}' is not a complete megatron_slm checkpoint{hint}")
    return _read_json(path / MODEL_META)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); restore it or the checkpoint is damaged") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds {type(value).__name__}, not a JSON object; restore it or the checkpoint is damaged")
    return value


_DAMAGE = (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError)
_DAMAGE_TEXT = ("PytorchStreamReader", "unexpected EOF", "EOF", "truncated", "corrupt", "invalid load key", "unpickl")


def _check_complete(path: Path) -> None:
    """Up front, before any rank reads a tensor: torch DCP's index (``.metadata``) and megatron-core's
    ``common.pt`` exist, and every shard the index names exists and is long enough."""
    def damaged(what):
        return CheckpointError(f"checkpoint '{path}' is damaged or incomplete: {what}; restore the files from a copy "
                               "or use another checkpoint (iteration)")

    if _read_json(path / "metadata.json").get("sharded_backend") != "torch_dist":  # another dist_checkpointing backend: its own layout, its own errors
        return
    index = path / ".metadata"
    missing = [f.name for f in (index, path / "common.pt") if not f.is_file()]
    if missing:
        raise damaged(f"{' and '.join(missing)} missing")
    try:
        from torch.distributed.checkpoint import FileSystemReader

        storage = FileSystemReader(str(path)).read_metadata().storage_data
        need = {}
        for info in storage.values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    except Exception as exc:  # noqa: BLE001 - unpickling a damaged index fails in many ways
        raise damaged(f"{index.name} cannot be read ({_describe(exc)})") from None
    bad = []
    for rel, size in sorted(need.items()):
        f = path / rel
        if not f.is_file():
            bad.append(f"shard {rel} is missing")
        elif f.stat().st_size < size:
            bad.append(f"shard {rel} is truncated ({f.stat().st_size} of at least {size} bytes)")
    if bad:
        raise damaged(", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))


def _is_damage(exc: BaseException) -> bool:
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        return any(_is_damage(f[0] if isinstance(f, tuple) else f) for f in failures.values())
    while exc is not None:
        if isinstance(exc, _DAMAGE) or any(t.lower() in str(exc).lower() for t in _DAMAGE_TEXT):
            return True
        exc = exc.__cause__
    return False


def _load(sharded_state: dict, path: Path, what: str, meta: dict) -> dict:
    from megatron.core import dist_checkpointing

    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException (truncated shards)

    _check_complete(path)
    try:
        return dist_checkpointing.load(sharded_state, str(path))
    except (Exception, CheckpointException) as exc:  # mismatches and damage surface deep inside
        if _is_damage(exc):
            raise CheckpointError(
                f"checkpoint '{path}' is damaged or incomplete ({_describe(exc)}); restore the files from a copy or "
                "use another checkpoint (iteration)"
            ) from exc
        raise CheckpointError(
            f"checkpoint '{path}' does not fit this {what} ({_describe(exc)}); "
            f"its model config is {meta['model']}"
        ) from exc


def load_model_weights(model, directory: str, expected_vocab: int | None = None) -> dict:
    """Load weights saved by ``save_model_weights`` or a training checkpoint (any TP/PP, interleaved or not) into
    ``model`` (a GPTModel or a list of chunks)."""
    meta = read_model_meta(directory)
    vocab = meta["model"].get("vocab_size")
    if expected_vocab is not None and vocab != expected_vocab:
        raise CheckpointError(
            f"checkpoint '{directory}' has vocab_size={vocab} but the run expects {expected_vocab}: the policy, the "
            "reference and the tokenizer must share one vocabulary"
        )
    sharded = model_sharded_state_dict(model)
    loaded = _load(sharded, resolve(directory), "model", meta)
    load_model_state(model, {k: v for k, v in loaded.items() if k in sharded})  # a training checkpoint has more
    return meta


def is_hf_dir(directory: str | Path) -> bool:
    """A transformers model directory (config.json, no megatron_slm metadata)."""
    p = Path(directory)
    return (p / "config.json").is_file() and not (p / MODEL_META).is_file() and not (p / LATEST).is_file()


def read_model_config(directory: str):
    """The ModelConfig a weights source was saved with: a megatron_slm checkpoint (its slm_model.json, or a
    training run's latest iteration) or a transformers Llama/Mistral directory (its config.json)."""
    from megatron_slm.config import ModelConfig
    from megatron_slm.model.presets import apply_preset

    if is_hf_dir(directory):
        from megatron_slm.model import hf

        return hf.hf_config_to_model_config(hf.read_hf_config(directory))
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    m = ModelConfig(**{k: v for k, v in read_model_meta(directory).get("model", {}).items() if k in fields})
    apply_preset(m)
    if m.num_query_groups is None:
        m.num_query_groups = m.num_attention_heads
    missing = [n for n in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size")
               if getattr(m, n) is None]
    if missing:
        raise CheckpointError(f"checkpoint '{directory}': its {MODEL_META} lacks {', '.join(missing)}")
    return m


def architecture_differences(configured, saved) -> dict:
    """{field: (configured value, checkpoint value)} over ARCH_FIELDS (numbers compared as numbers)."""
    def same(a, b):
        return a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b))

    return {f: (getattr(configured, f), getattr(saved, f)) for f in ARCH_FIELDS
            if not same(getattr(configured, f), getattr(saved, f))}


def tokenizer_fingerprints(directory: str) -> set:
    """sha256 fingerprints of the tokenizer a weights source belongs to: those its slm_model.json records, or
    of the tokenizer files (tokenizer.model / tokenizer.json) in a transformers directory. Empty: unknown."""
    import hashlib

    if is_hf_dir(directory):
        return {hashlib.sha256((Path(directory) / name).read_bytes()).hexdigest()
                for name in ("tokenizer.model", "tokenizer.json") if (Path(directory) / name).is_file()}
    return set((read_model_meta(directory).get("tokenizer") or {}).get("fingerprints") or [])


def resume_source(ck_cfg) -> str | None:
    """Where a training checkpoint to resume from lies (--load, else --save), if there is one."""
    source = ck_cfg.load or ck_cfg.save
    if source and (latest_iteration(source) is not None or (Path(source) / TRAINER_STATE).is_file()):
        return source
    return None


def weights_vocab(directory: str) -> int | None:
    """The vocabulary size of a weights source: megatron_slm checkpoint or transformers directory."""
    return read_model_config(directory).vocab_size


def load_weights(model, directory: str, model_cfg, expected_vocab: int | None = None) -> None:
    """Weights from a megatron_slm checkpoint (any TP/PP) or straight from a transformers Llama/Mistral dir,
    into a model built from ``model_cfg``; refused when the checkpoint's architecture differs in any field."""
    saved = read_model_config(directory)
    diff = architecture_differences(model_cfg, saved)
    if diff:
        raise CheckpointError(
            f"'{directory}' was saved with another architecture than the model it is loaded into: "
            + "; ".join(f"{k} {b} (checkpoint) vs {a} (config)" for k, (a, b) in diff.items())
        )
    if not is_hf_dir(directory):
        load_model_weights(model, directory, expected_vocab)
        return
    from megatron_slm.model import hf

    with torch.no_grad():
        weights = hf.HFWeights(directory)
        for chunk in model if isinstance(model, (list, tuple)) else [model]:  # the chunks of an interleaved pipeline
            hf.load_hf_weights_into(chunk, weights, saved)


# ----------------------------------------------------------------------------------------------
# Training checkpoints


def _training_sharded_state(trainer, is_loading: bool) -> dict:
    from megatron_slm.parallel import dist_optimizer

    chunks = _ddp_chunks(trainer)
    if dist_optimizer.uses_distributed_optimizer(chunks[0]):
        for chunk in chunks:
            dist_optimizer.finish_param_gather(chunk)  # --overlap-param-gather: the weights saved are updated
    # The GPTModel itself, not its DDP wrapper, so keys match weights-only checkpoints (no "module." prefix).
    model_sd = model_sharded_state_dict(trainer.policy_module)
    if dist_optimizer.uses_distributed_optimizer(chunks[0]):  # its format and gaps: parallel/dist_optimizer.py
        return {"model": model_sd,
                "optimizer": dist_optimizer.sharded_state_dict(chunks[0], trainer.optimizer, model_sd, is_loading)}
    return {"model": model_sd, "optimizer": trainer.optimizer.sharded_state_dict(model_sd, is_loading=is_loading)}


def _ddp_chunks(trainer) -> list:
    """The trainer's DDP-wrapped model chunks (one without an interleaved pipeline)."""
    return trainer.model if isinstance(trainer.model, list) else [trainer.model]


def _layout(trainer) -> dict:
    ps = trainer.ps
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "world": dist.get_world_size()}


def _rank_state(trainer) -> dict:
    from megatron.core import tensor_parallel

    state = {
        "cpu_rng": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "selector": trainer.selector.state_dict() if trainer.selector else None,
        "layout": _layout(trainer),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def save_training_checkpoint(trainer, root: str, keep_last: int = 2) -> Path:
    """Model, optimizer, LR schedule, RNG, data position and selection state; atomic; keeps the last N."""
    final = iteration_dir(root, trainer.iteration)
    ds = getattr(trainer, "ds", None)

    def write(tmp):
        if ds is not None:  # the engine's own (ZeRO-partitioned) files, for an exact resume
            ds.save(str(tmp.parent), tmp.name, client_state={"iteration": trainer.iteration})
        rank_dir = tmp / "rank_state"
        rank_dir.mkdir(exist_ok=True)
        torch.save(_rank_state(trainer), rank_dir / f"rank{_rank():05d}.pt")
        if _rank() == 0:
            (tmp / MODEL_META).write_text(_model_meta_text(trainer.cfg.model, trainer.tokenizer_fingerprints))
            (tmp / TRAINER_STATE).write_text(json.dumps({
                "iteration": trainer.iteration,
                "consumed_samples": trainer.iteration * trainer.cfg.train.global_batch_size,
                "scheduler": trainer.scheduler.state_dict(),
                "config": trainer.cfg.to_dict(),
            }, indent=2))

    # With DeepSpeed the model weights go in as dist_checkpointing shards too (the GPTModel's, as a weights
    # checkpoint holds them): the iteration then loads with --ref-load and converts like any other.
    sharded = ({"model": model_sharded_state_dict(trainer.policy_module)} if ds is not None
               else _training_sharded_state(trainer, is_loading=False))
    _save(sharded, final, write, on_commit=lambda: write_atomic(Path(root) / LATEST, str(trainer.iteration)))
    if _rank() == 0:
        done = [p for p in iteration_dirs(root) if p != final]
        for old in done[:-(keep_last - 1)] if keep_last > 1 else (done if keep_last == 1 else []):
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_training_checkpoint(trainer, directory: str) -> int:
    """Restore a training checkpoint (root or iteration dir) into ``trainer``; returns its iteration.

    Weights and optimizer state reshard to the current TP/PP; per-rank RNG and selection state are
    restored when the layout is unchanged (else the threshold of rank 0 is used and RNGs keep their seeds).
    """
    from megatron.core import tensor_parallel

    path = resolve(directory)
    if getattr(trainer, "ds", None) is not None:
        if not (path / TRAINER_STATE).is_file():
            raise CheckpointError(f"'{path}' is not a complete DeepSpeed training checkpoint of megatron_slm")
        trainer.ds.load(str(path.parent), path.name)
    else:
        meta = read_model_meta(str(path))
        if not (path / TRAINER_STATE).is_file():
            raise CheckpointError(f"'{path}' holds model weights only, not a training checkpoint; load it with --ref-load or start a new run")
        _check_optimizer_format(trainer, path)
        loaded = _load(_training_sharded_state(trainer, is_loading=True), path, "model and optimizer", meta)
        load_model_state(trainer.policy_module, loaded["model"])
        trainer.optimizer.load_state_dict(loaded["optimizer"])
    state = _read_json(path / TRAINER_STATE)
    trainer.iteration = state["iteration"]
    trainer.reconcile_schedule(state["scheduler"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    rank_state = _load_rank_state(path)
    if rank_state["layout"] == _layout(trainer):
        torch.set_rng_state(rank_state["cpu_rng"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rank_state["tracker"])
        if torch.cuda.is_available() and "cuda_rng" in rank_state:
            torch.cuda.set_rng_state(rank_state["cuda_rng"])
    if trainer.selector is not None and rank_state["selector"]:
        trainer.selector.load_state_dict(rank_state["selector"])
    return trainer.iteration


def _check_optimizer_format(trainer, path: Path) -> None:
    """The distributed optimizer's state has its own format: a checkpoint resumes only with the setting it was
    written with (at any DP size)."""
    from megatron_slm.parallel import dist_optimizer

    config = _read_json(path / TRAINER_STATE).get("config") or {}
    saved = bool((config.get("parallel") or {}).get("use_distributed_optimizer", False))
    if saved != dist_optimizer.uses_distributed_optimizer(_ddp_chunks(trainer)[0]):
        how = "with" if saved else "without"
        raise CheckpointError(
            f"'{path}' was written {how} --use-distributed-optimizer, whose optimizer state has another format; "
            f"resume {how} it (any DP size), or start a new run from its weights with --pretrained-checkpoint")


def _load_rank_state(path: Path) -> dict:
    """This rank's RNG/selection state (rank 0's if it has none); a damaged file on any rank stops every rank
    with the same error."""
    own = path / "rank_state" / f"rank{_rank():05d}.pt"
    file = own if own.is_file() else path / "rank_state" / "rank00000.pt"
    state, local = None, []
    try:
        state = torch.load(file, weights_only=False)
        if not isinstance(state, dict) or "layout" not in state:
            raise ValueError("not a megatron_slm rank state")
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad pickle, missing file ...
        local = [f"{file} is damaged or missing ({_describe(exc)})"]
    failures = _agreed_failures(bool(local), local)
    if failures:
        raise CheckpointError(
            f"checkpoint '{path}' is damaged: {'; '.join(failures)}; "
            f"restore the file from a copy, or point {path.parent / LATEST} at an earlier iteration"
        )
    return state
