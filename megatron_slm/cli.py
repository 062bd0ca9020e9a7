"""The one CLI: ``slm train | check-config | plan | score-reference | evaluate | compare | dynamics | reweight | demo |
preprocess | convert | viz | plot``. It parses and dispatches, nothing more.

    torchrun --nproc-per-node 4 -m megatron_slm.cli train --config cfg.yaml --tensor-model-parallel-size 2

Every config flag comes from the config dataclasses' field metadata (megatron_slm.config); the other flags are
defined here, each command's work is done by its package module. Nothing here imports torch until a command
runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_slm.config import SCORE_DTYPES, add_override_arguments, load_config
from megatron_slm.config.arguments import ALL
from megatron_slm.errors import ConfigError, SLMError


def _default_threads() -> None:
    """CPU runs: one process per core share unless OMP_NUM_THREADS says otherwise. torch's default (every
    core in every process) oversubscribes a shared or multi-rank CPU box and was measured 2-10x slower."""
    if "OMP_NUM_THREADS" not in os.environ:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's filling of a description or epilog paragraph written as one line; a paragraph written on
    several lines (each command's example) is kept as written."""

    def _fill_text(self, text, width, indent):
        kept, filled = super()._fill_text, argparse.HelpFormatter._fill_text
        return "\n\n".join(
            kept(p, width, indent) if "\n" in p else filled(self, p, width, indent) for p in text.split("\n\n")
        )


class _DefaultsHelpFormatter(_HelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The same, each flag's help ending with its default (for flags whose help does not say it)."""


# The config flags of each command: the config leaves it reads, by YAML section. ALL: every leaf of the section;
# else the leaves' names (a subsection, the reference's "model", is one name); None: every leaf of every section.
# A --config YAML may still hold any section (e.g. a training config reused for evaluate): what the command does
# not read is loaded and left unused. Commands missing here take no config (reweight, demo and the data and
# checkpoint tools: preprocess, convert, viz, plot).
_EVAL_WINDOWS = {  # slm evaluate, slm dynamics: model shapes come from each checkpoint
    "parallel": ("tensor_model_parallel_size", "pipeline_model_parallel_size", "sequence_parallel"),
    "train": ("micro_batch_size", "seq_length", "seed", "logging_level"),
    "data": ("data_path",),
}
CONFIG_FLAGS = {
    "train": None,
    "check-config": None,
    "plan": {  # what sizes the memory and the step time of the training run, and what validate checks of it
        "model": ALL,
        "reference": ("model", "dtype"),
        "parallel": ALL,
        "slm": ALL,
        "train": (
            "micro_batch_size",
            "global_batch_size",
            "seq_length",
            "recompute_granularity",
            "recompute_method",
            "recompute_num_layers",
            "bf16",
            "peak_tflops",
            "deepspeed",
            "logging_level",
        ),
    },
    "score-reference": {  # the reference, its layout, and the data flags that decide the samples training reads
        "model": ALL,
        "reference": ALL,
        "parallel": (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "sequence_parallel",
            "num_layers_per_virtual_pipeline_stage",
        ),
        "train": (
            "micro_batch_size",
            "global_batch_size",
            "seq_length",
            "train_iters",
            "eval_iters",
            "seed",
            "log_interval",
            "logging_level",
            "exit_duration_in_mins",
        ),
        "data": ALL,
    },
    "evaluate": _EVAL_WINDOWS,
    "dynamics": _EVAL_WINDOWS,
}

# The example command at the end of each command's --help.
EXAMPLES = {
    "train": "torchrun --nproc-per-node 8 -m megatron_slm.cli train --config run.yaml --save runs/slm \\\n"
    "    --ref-load runs/reference --data-path 0.7 data/owm 0.3 data/general",
    "check-config": "slm check-config --config run.yaml --world-size 8 --data-path data/owm --ref-load runs/reference",
    "plan": "slm plan --config launch/configs/mistral7b_owm_slm_k0.7.yaml --world-size 32 --gpu-memory 80",
    "score-reference": "torchrun --nproc-per-node 8 -m megatron_slm.cli score-reference --config run.yaml \\\n"
    "    --ref-load runs/reference --data-path 0.7 data/owm 0.3 data/general --train-iters 1000",
    "reweight": "slm reweight --run runs/slm",
    "evaluate": "slm evaluate --load runs/slm runs/clm --data-path data/math_valid data/web_valid \\\n"
    "    --seq-length 512 --eval-samples 200 --out eval_out",
    "compare": "slm compare --eval-dir eval_out runs/slm runs/clm --bootstrap-block-size 16 --seed 0",
    "dynamics": "slm dynamics --run slm=runs/slm --run clm=runs/clm --data-path data/math_valid \\\n"
    "    --seq-length 512 --eval-samples 200 --out dynamics_out",
    "demo": "slm demo --out demo_out --nproc 4",
    "preprocess": "slm preprocess data/owm/ --tokenizer tokenizer.model --output-prefix data/owm --workers 8",
    "convert": "slm convert hf-to-megatron --input hf/TinyLlama-1.1B --output ckpt/base --verify",
    "convert hf-to-megatron": "slm convert hf-to-megatron --input hf/TinyLlama-1.1B --output ckpt/base --verify",
    "convert megatron-to-hf": "slm convert megatron-to-hf --input runs/slm --output hf_out/slm \\\n"
    "    --tokenizer-model tokenizer.model",
    "viz": "slm viz --dump runs/slm --out selection.html",
    "plot": "slm plot slm=runs/slm clm=runs/clm --out plots",
}


def _command(
    sub, name: str, help: str, description: str, formatter=_HelpFormatter, example: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand ``name``, its --help ending with ``EXAMPLES[example or name]``."""
    return sub.add_parser(
        name,
        help=help,
        description=description,
        epilog="example:\n  " + EXAMPLES[example or name],
        formatter_class=formatter,
    )


def package_version() -> str:
    """The installed megatron_slm's version (its package metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron_slm")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


class _VersionAction(argparse.Action):
    """``--version``: the version is read only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"megatron_slm {package_version()}")
        parser.exit()


def _config_arguments(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument(
        "--config",
        metavar="YAML",
        help="YAML config file; flags given here override its values (default: none, built-in defaults)",
    )
    p.add_argument(
        "--all-ranks-log",
        action="store_true",
        help="log from every rank with a [rank N] prefix (default: rank 0, training log from the last rank)",
    )
    add_override_arguments(p, CONFIG_FLAGS[command])


def build_parser() -> argparse.ArgumentParser:
    from megatron_slm import demo

    parser = argparse.ArgumentParser(prog="slm", description="Rho-1 Selective Language Modeling on megatron-core")
    parser.add_argument("--version", action=_VersionAction, help="print the version of megatron_slm and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _config_arguments(
        _command(
            sub,
            "train",
            help="train a policy with SLM or CLM (launch under torchrun; alone it runs one process)",
            description="Train a policy with SLM or CLM. A rerun with the same --save resumes from its latest checkpoint.",
        ),
        "train",
    )
    p_check = _command(
        sub,
        "check-config",
        help="validate a config (and its inputs) and print it resolved",
        description="Run the input checks of 'slm train' without training: layout, shapes, data and checkpoint "
        "vocabularies, score sidecars; prints the resolved config.",
    )
    p_check.add_argument(
        "--world-size",
        type=int,
        default=None,
        metavar="N",
        help="processes the run will use, to check the TP x PP x DP layout (default: not checked)",
    )
    p_check.add_argument(
        "--gpu-memory",
        type=float,
        default=80.0,
        metavar="GIB",
        help="with --world-size: warn when the plan's peak per GPU (slm plan) exceeds this many GiB (default: 80)",
    )
    _config_arguments(p_check, "check-config")
    p_plan = _command(
        sub,
        "plan",
        help="memory and speed plan per GPU of a config on N GPUs (no GPU needed)",
        description="Count the parameters of each rank's policy and reference slices (megatron-core models built on "
        "the meta device), then estimate per GPU: weights, fp32 gradients, Adam state and master weights "
        "with and without the distributed optimizer, activations of the micro-batches in flight (with "
        "the configured recompute), the loss head, the reference's forward-only pass; FITS / DOES NOT FIT "
        "against --gpu-memory; step time and tokens/s from FLOPs at --assumed-mfu of --peak-tflops "
        "(unset here: 989, H100/H200 dense bf16). With --scoring-tokens, also the offline scoring run "
        "(slm score-reference) at this layout: hours, memory per GPU, sidecar, part and merge bytes. "
        "Formulas: megatron_slm/planning/plan.py.",
    )
    p_plan.add_argument(
        "--world-size", type=int, required=True, metavar="N", help="GPUs (processes) of the run (required, no default)"
    )
    p_plan.add_argument(
        "--gpu-memory", type=float, default=80.0, metavar="GIB", help="memory per GPU in GiB (default: 80)"
    )
    p_plan.add_argument(
        "--assumed-mfu",
        type=float,
        default=0.40,
        metavar="X",
        help="model FLOPs utilisation assumed for the speed estimate (default: 0.40)",
    )
    p_plan.add_argument(
        "--scoring-tokens",
        type=_count,
        default=None,
        metavar="N",
        help="tokens of the datasets 'slm score-reference' scores (their num_tokens, e.g. 14e9): adds "
        "the offline-scoring section: reference forward time, memory per GPU, sidecar bytes "
        "(fp32/bf16), part bytes before the merge, the merge's I/O (default: none, no section)",
    )
    p_plan.add_argument(
        "--scoring-documents",
        type=_count,
        default=None,
        metavar="N",
        help="with --scoring-tokens: documents in those datasets, for the size of the sidecars' .idx "
        "(default: one per 1,000 tokens, assumed)",
    )
    p_plan.add_argument(
        "--scoring-datasets",
        type=int,
        default=1,
        metavar="N",
        help="with --scoring-tokens: datasets (--data-path prefixes) scored, one sidecar each; with "
        "two or more the parts store an int16 dataset id per sample, else int64 (default: 1)",
    )
    p_plan.add_argument(
        "--scoring-disk-bandwidth",
        type=float,
        default=1.0,
        metavar="GB/S",
        help="with --scoring-tokens: read + write bandwidth of the disk holding the parts and the "
        "sidecars, assumed for the merge's time (default: 1.0)",
    )
    _config_arguments(p_plan, "plan")
    p_score = _command(
        sub,
        "score-reference",
        help="write per-token reference scores for offline SLM (under torchrun, with the training run's data flags)",
        description="Score every training sample with the reference (forward only, TP/PP/DP, resumable) and write "
        "one score sidecar per dataset; then train with --reference-mode offline. SIGUSR1 / SIGTERM "
        "or --exit-duration-in-mins stop it after a step (exit 0, scores kept); rerunning the same "
        "command resumes.",
    )
    p_score.add_argument(
        "--dtype",
        default="fp32",
        choices=SCORE_DTYPES,
        help="storage of the scores: fp32 replays online SLM exactly, bf16 halves the disk (default: fp32)",
    )
    p_score.add_argument(
        "--force", action="store_true", help="overwrite existing sidecars (default: an existing sidecar is an error)"
    )
    _config_arguments(p_score, "score-reference")
    p_reweight = _command(
        sub,
        "reweight",
        help="the domain-reweighting control of an SLM run: CLM blend weights with its token mix",
        description="Read an SLM run's summary.json (blend weights w_i, selected fraction f_i of each dataset) and "
        "print the --data-path under which plain CLM trains on the same mix of datasets: "
        "w'_i = w_i f_i / sum_j w_j f_j. A CLM run with it separates token selection from domain "
        "reweighting.",
    )
    p_reweight.add_argument(
        "--run",
        required=True,
        metavar="DIR",
        help="the SLM run's --save directory, holding summary.json (required, no default)",
    )
    p_reweight.add_argument(
        "--digits", type=int, default=4, metavar="N", help="decimals of the printed weights (default: 4)"
    )
    p_eval = _command(
        sub,
        "evaluate",
        help="loss and perplexity of checkpoints on datasets, on fixed samples (no seed involved)",
        description="Mean token loss and perplexity of each checkpoint on each dataset, reported separately. The "
        "samples are fixed: a dataset's documents in file order cut into consecutive windows of "
        "--seq-length + 1 tokens (EOD labels masked as in training), the first --eval-samples of them; "
        "every checkpoint sees the same tokens. Model shapes come from each checkpoint. Launch under "
        "torchrun for TP/PP/DP (data-parallel ranks split the windows); alone it runs one process. "
        "With --split-reference, each row adds the mean loss and token count on the 'learnable' "
        "tokens (the top --split-ratio by excess loss of --split-base over the reference: what SLM "
        "would select) and on the rest; definition: megatron_slm/analysis/evaluate.py.",
    )
    p_eval.add_argument(
        "--load",
        nargs="+",
        required=True,
        metavar="CKPT",
        dest="eval_load",
        help="checkpoints: a training run root (its latest iteration), an iter_NNNNNNN directory, a "
        "weights checkpoint or a transformers directory (required, no default)",
    )
    p_eval.add_argument(
        "--eval-samples", type=int, default=None, metavar="N", help="windows per dataset, the first N (default: all)"
    )
    p_eval.add_argument(
        "--out",
        default="eval_out",
        metavar="DIR",
        help="where eval.json, eval.csv and (several iterations of a run) eval.png go (default: eval_out)",
    )
    p_eval.add_argument(
        "--split-reference",
        default=None,
        metavar="CKPT",
        help="reference checkpoint of the learnable / not-learnable split: per dataset, the top "
        "--split-ratio of the valid tokens by excess loss L_base - L_ref are 'learnable' (what "
        "SLM would select), the rest not; every --load reports its mean loss and token count on "
        "both (default: none, no split)",
    )
    p_eval.add_argument(
        "--split-base",
        default=None,
        metavar="CKPT",
        help="the base model of the split's excess loss (default: the first --load)",
    )
    p_eval.add_argument(
        "--split-ratio",
        type=float,
        default=None,
        metavar="Q",
        help="share of the valid tokens that are learnable, in (0, 1] (default: 0.6, the paper's k for 1B models)",
    )
    _config_arguments(p_eval, "evaluate")
    # A command of its own over a saved evaluation (eval_windows.npz), not 'slm evaluate --compare': it needs no
    # torch, config or model, so a comparison (other pair, block size, seed) re-runs in a second on any machine,
    # and any evaluation already on disk, the demo's included, can be compared without a second forward pass.
    p_cmp = _command(
        sub,
        "compare",
        help="paired loss difference A - B of two checkpoints of one 'slm evaluate', with bootstrap intervals",
        description="The paired difference of the mean token loss of checkpoints A and B, evaluated by one "
        "'slm evaluate' run (its per-window losses, eval_windows.npz), per dataset: over all tokens, within "
        "the learnable / not-learnable split (when evaluate had --split-reference) and per quarter of the "
        "windows. Each difference has a percentile bootstrap interval over contiguous blocks of windows, "
        "seeded and deterministic; 'significant' when it excludes 0. Prints a table and writes "
        "compare.json. Definition: megatron_slm/analysis/compare.py.",
    )
    p_cmp.add_argument(
        "cmp_a",
        metavar="A",
        help="checkpoint A, as given to 'slm evaluate --load' (or the same directory) (required, no default)",
    )
    p_cmp.add_argument("cmp_b", metavar="B", help="checkpoint B, likewise (required, no default)")
    p_cmp.add_argument(
        "--eval-dir",
        default="eval_out",
        metavar="DIR",
        help="the --out directory of 'slm evaluate' (default: eval_out, evaluate's default)",
    )
    p_cmp.add_argument("--out", default=None, metavar="DIR", help="where compare.json goes (default: the --eval-dir)")
    p_cmp.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        metavar="C",
        help="coverage of the intervals, in (0, 1) (default: 0.95)",
    )
    p_cmp.add_argument(
        "--bootstrap-block-size",
        type=int,
        default=16,
        metavar="W",
        help="windows per resampled block: consecutive windows share documents, so they are resampled "
        "together; 1 is the i.i.d. bootstrap (default: 16, about n^(1/3) for a few thousand windows)",
    )
    p_cmp.add_argument(
        "--bootstrap-resamples", type=int, default=2000, metavar="N", help="bootstrap resamples (default: 2000)"
    )
    p_cmp.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="seed of the resampling (numpy PCG64); the same seed gives the same intervals (default: 0)",
    )
    p_dyn = _command(
        sub,
        "dynamics",
        help="token loss dynamics (Rho-1 Fig. 2): H->H, L->H, H->L, L->L shares and losses over checkpoints",
        description="Classify every valid token of a dataset's fixed evaluation windows (those of 'slm evaluate') "
        "by its loss at the first and at the last checkpoint of each run: H (loss above the threshold) or "
        "L, giving H->H, L->H, H->L and L->L. One threshold for all runs, so SLM and CLM runs compare. "
        "Per run and checkpoint: each class's share and mean loss. Writes dynamics.json, dynamics.csv "
        "and dynamics.png. Launch under torchrun for TP/PP/DP; alone it runs one process. Definitions: "
        "megatron_slm/analysis/dynamics.py.",
    )
    # torchrun's own parser takes a bare --run for an abbreviation of its --run-path: hence the long spelling
    p_dyn.add_argument(
        "--run",
        "--run-checkpoints",
        action="append",
        required=True,
        metavar="NAME=CKPT[,CKPT...]",
        dest="dyn_runs",
        help="a run: its name and two or more checkpoints in training order, or NAME=DIR for all "
        "iter_* checkpoints of a training run's directory; repeat for each run; under torchrun "
        "spell it --run-checkpoints (required, no default)",
    )
    p_dyn.add_argument(
        "--eval-samples", type=int, default=None, metavar="N", help="windows of the dataset, the first N (default: all)"
    )
    p_dyn.add_argument(
        "--dynamics-threshold",
        type=float,
        default=None,
        metavar="LOSS",
        help="loss (nats) above which a token's loss is high (H), the same for every run (default: "
        "the median token loss at the first checkpoint, all runs pooled)",
    )
    p_dyn.add_argument(
        "--dynamics-reference",
        default=None,
        metavar="CKPT",
        help="the SLM runs' reference checkpoint: adds the reference-hard tokens (reference loss above the "
        "threshold, not selected at --dynamics-select-ratio at the first checkpoint) and their mean loss per "
        "checkpoint, what SLM may forget (default: unset, not computed)",
    )
    p_dyn.add_argument(
        "--dynamics-select-ratio",
        type=float,
        default=0.6,
        metavar="K",
        help="k of the SLM runs, for the reference-hard tokens (default: 0.6)",
    )
    p_dyn.add_argument(
        "--out",
        default="dynamics_out",
        metavar="DIR",
        help="where dynamics.json, dynamics.csv and dynamics.png go (default: dynamics_out)",
    )
    _config_arguments(p_dyn, "dynamics")
    demo.add_arguments(
        _command(
            sub,
            "demo",
            formatter=_DefaultsHelpFormatter,
            help="the CPU demo: base, reference, then SLM vs three controls",
            description="The Rho-1 recipe at toy scale: build a two-domain corpus (math, general), train a base, tune "
            "it on clean math into the reference, then train four policies from the base (CLM, SLM at "
            "TP=2 x PP=2, random k%, CLM on the reweighted blend) and evaluate all six on held-out math "
            "and general text.",
        )
    )
    _preprocess_arguments(sub)
    _convert_arguments(sub)
    _viz_arguments(sub)
    _plot_arguments(sub)
    return parser


def _preprocess_arguments(sub) -> None:
    p = _command(
        sub,
        "preprocess",
        help="tokenize text (JSONL, text, parquet, Arrow, datasets directories) into a megatron-core indexed dataset",
        description="Tokenize .jsonl/.json/.txt (also .gz/.zst), parquet and Arrow files or datasets directories "
        "into a megatron-core indexed dataset (PREFIX.bin/.idx) plus PREFIX.json metadata (the tokenizer's "
        "fingerprint, the counts, the range of the token ids), each document followed by the EOD id. "
        "Documents are tokenized in --workers processes and written in input order: the output does not "
        "depend on --workers. Parquet, Arrow and .zst inputs need the data extra (pip install "
        "'megatron_slm[data]'), a tokenizer.json the hf extra. Formats and metadata: "
        "megatron_slm/data/preprocess.py.",
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="input files, directories (searched recursively) or globs (default: none; name them here or with --input)",
    )
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="PATH",
        help="another input, the same as a positional one; repeatable (default: none)",
    )
    p.add_argument(
        "--output-prefix",
        required=True,
        metavar="PREFIX",
        help="writes PREFIX.bin, PREFIX.idx and PREFIX.json (required, no default)",
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="PATH",
        help="a sentencepiece .model or a Hugging Face tokenizer.json (required, no default)",
    )
    p.add_argument(
        "--eod-token",
        default=None,
        metavar="TOKEN",
        help="token (or id) appended after each document (default: the tokenizer's eos)",
    )
    p.add_argument(
        "--json-key",
        default="text",
        metavar="KEY",
        help="JSON field, or parquet / Arrow column, holding the text (default: text)",
    )
    p.add_argument(
        "--split-lines",
        action="store_true",
        help="text files: each non-empty line is a document (default: each file is one document)",
    )
    p.add_argument("--workers", type=int, default=2, metavar="N", help="tokenizer processes (default: 2)")
    p.add_argument(
        "--no-append-eod",
        dest="append_eod",
        action="store_false",
        help="do not append the EOD id after each document (default: appended)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing PREFIX.bin/.idx, never an input (default: an existing output is an error)",
    )
    p.add_argument(
        "--log-every",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between updates of the progress bar (default: 1)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar and no summary on stderr (default: both; the bar only on a terminal)",
    )


def _convert_arguments(sub) -> None:
    from megatron_slm.conversion import DTYPE_NAMES

    p = _command(
        sub,
        "convert",
        help="convert transformers Llama/Mistral directories to megatron_slm checkpoints and back",
        description="Convert a transformers Llama/Mistral directory into a megatron_slm checkpoint "
        "(hf-to-megatron), which loads at any TP/PP (--ref-load CKPT, --pretrained-checkpoint CKPT), or a "
        "megatron_slm checkpoint saved at any TP/PP into a transformers directory (megatron-to-hf), e.g. for "
        "lm-eval. Runs as one process (no torchrun). Needs the hf extra: pip install 'megatron_slm[hf]'. "
        "Library: megatron_slm/conversion/.",
    )
    directions = p.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    a = _command(
        directions,
        "hf-to-megatron",
        help="transformers directory -> megatron_slm checkpoint (loads at any TP/PP)",
        description="Convert a transformers Llama/Mistral directory (config.json + safetensors or .bin "
        "weights) into a megatron_slm checkpoint; with --verify, compare the logits of both on random tokens.",
        example="convert hf-to-megatron",
    )
    a.add_argument(
        "--input",
        required=True,
        metavar="HF_DIR",
        help="transformers model directory, config.json + weights (required, no default)",
    )
    a.add_argument(
        "--output",
        required=True,
        metavar="CKPT",
        help="checkpoint directory to write, for --ref-load / --pretrained-checkpoint (required, no default)",
    )
    a.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="dtype of the saved weights (default: fp32)")
    a.add_argument(
        "--verify",
        action="store_true",
        help="compare logits with transformers (fp32) after converting (default: not compared)",
    )
    a.add_argument(
        "--verify-seq-len", type=int, default=64, metavar="N", help="tokens per sequence for --verify (default: 64)"
    )
    a.add_argument(
        "--force",
        action="store_true",
        help="replace an existing output, never an input (default: an existing output is an error)",
    )
    b = _command(
        directions,
        "megatron-to-hf",
        help="megatron_slm checkpoint (any TP/PP) -> transformers directory",
        description="Convert a megatron_slm checkpoint (a training run's --save root, one of its iter_NNNNNNN "
        "directories, or a converted checkpoint; any TP/PP) into a transformers directory (config.json, "
        "safetensors weights and, with a tokenizer, its files) that AutoModelForCausalLM and lm-eval load.",
        example="convert megatron-to-hf",
    )
    b.add_argument(
        "--input",
        required=True,
        metavar="CKPT",
        help="checkpoint directory written by slm train or hf-to-megatron (required, no default)",
    )
    b.add_argument(
        "--output", required=True, metavar="HF_DIR", help="transformers directory to write (required, no default)"
    )
    b.add_argument(
        "--dtype",
        choices=(*DTYPE_NAMES, "auto"),
        default="auto",
        help="dtype of the written weights (default: auto, the dtype the checkpoint was converted in, else fp32)",
    )
    b.add_argument(
        "--hf-config",
        default=None,
        metavar="PATH",
        help="config.json (or HF directory) whose token ids / model type to keep, for checkpoints that were "
        "not written by hf-to-megatron (default: the config hf-to-megatron recorded, else Llama/Mistral defaults)",
    )
    b.add_argument(
        "--tokenizer-model",
        default=None,
        metavar="PATH",
        help="tokenizer to write next to the weights, so that AutoTokenizer and lm-eval load the output: a "
        "sentencepiece .model, a tokenizer.json or an HF directory holding one; it must be the "
        "tokenizer the checkpoint records (sha256) (default: the tokenizer files hf-to-megatron kept, "
        "if any, else only the weights are written, with a warning)",
    )
    b.add_argument(
        "--force",
        action="store_true",
        help="replace an existing output, never an input (default: an existing output is an error)",
    )


def _viz_arguments(sub) -> None:
    p = _command(
        sub,
        "viz",
        help="per-token selection heatmap (HTML, optional PNG): selection dumps, or checkpoints on some text",
        description="Per-token SLM selection heatmap: every token coloured by its excess loss (policy - "
        "reference), the selected ones marked, in one self-contained HTML page (--out; hover a token for its "
        "losses). Two sources: (a) the selection dumps a training run writes (--selection-dump-interval N "
        "--save DIR), or (b) computed here on CPU (TP=1, PP=1) from policy and reference checkpoints on "
        'some text (--text: a file, .jsonl one document per line\'s "text", or the text itself; '
        "repeatable). --png FILE also draws one dump with matplotlib (the viz extra: pip install "
        "'megatron_slm[viz]'). Library: megatron_slm/analysis/heatmap.py.",
    )
    src = p.add_argument_group("source (a): selection dumps")
    src.add_argument(
        "--dump",
        nargs="+",
        metavar="DIR_OR_FILE",
        help="run directory, its selection_dumps/ directory, or iter_*.pt files (default: none; give --dump or "
        "--policy)",
    )
    ck = p.add_argument_group("source (b): checkpoints + text")
    ck.add_argument(
        "--policy",
        nargs="+",
        metavar="CKPT",
        help="policy checkpoint(s); several = one section each (default: none; give --dump or --policy)",
    )
    ck.add_argument("--reference", metavar="CKPT", help="reference checkpoint (default: none; required with --policy)")
    ck.add_argument(
        "--text",
        nargs="+",
        metavar="FILE_OR_TEXT",
        help="documents to score (default: none; required with --policy)",
    )
    ck.add_argument(
        "--slm-select-ratio",
        dest="k",
        type=float,
        default=0.6,
        metavar="K",
        help="k: fraction of the scored tokens selected (default: 0.6)",
    )
    ck.add_argument(
        "--select-over",
        choices=("document", "batch"),
        default="document",
        help="top-k over each document, or over all texts together as one batch (default: document)",
    )
    ck.add_argument(
        "--seq-length",
        type=int,
        default=None,
        metavar="N",
        help="window length (default: the models' max positions)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="tokenizer (.model / tokenizer.json); with checkpoints: the one they were trained with, its "
        "sha256 checked against theirs (default: with dumps, the path they recorded; required with --policy)",
    )
    p.add_argument("--out", required=True, metavar="HTML", help="HTML file to write (required, no default)")
    p.add_argument(
        "--title",
        default=None,
        help="page title (default: 'SLM token selection during training', or '... (policy vs reference)')",
    )
    p.add_argument(
        "--max-sequences", type=int, default=4, metavar="N", help="sequences shown per dump, 0 = all (default: 4)"
    )
    p.add_argument(
        "--max-tokens", type=int, default=512, metavar="N", help="tokens shown per sequence, 0 = all (default: 512)"
    )
    p.add_argument(
        "--max-dumps",
        type=int,
        default=8,
        metavar="N",
        help="dumps shown, spread over training, 0 = all (default: 8)",
    )
    p.add_argument(
        "--vmax",
        type=float,
        default=None,
        metavar="LOSS",
        help="colour range of the excess loss (default: the 98th percentile of |excess|)",
    )
    p.add_argument(
        "--ref-hard-loss",
        type=float,
        default=None,
        metavar="LOSS",
        help="unselected tokens whose reference loss is above this get a dashed box: what SLM leaves out because "
        "the reference is bad at it (default: the 75th percentile of the reference loss on the tokens shown)",
    )
    p.add_argument(
        "--layout",
        choices=("auto", "by_dump", "by_sequence"),
        default="auto",
        help="by_sequence: each sequence at every dump/checkpoint side by side (default: auto, by_sequence when "
        "all hold the same sequences)",
    )
    p.add_argument(
        "--png", default=None, metavar="FILE", help="also write a PNG of one dump, with matplotlib (default: none)"
    )
    p.add_argument(
        "--png-dump",
        type=int,
        default=-1,
        metavar="I",
        help="which shown dump the PNG draws, an index (default: -1, the last)",
    )
    p.add_argument("--png-sequences", type=int, default=2, metavar="N", help="sequences drawn in the PNG (default: 2)")
    p.add_argument(
        "--png-tokens", type=int, default=256, metavar="N", help="tokens drawn per sequence in the PNG (default: 256)"
    )


def _plot_arguments(sub) -> None:
    from megatron_slm.analysis.plots import PLOT_KINDS

    p = _command(
        sub,
        "plot",
        help="PNG plots of slm train runs: SLM vs CLM loss, selection statistics, excess-loss histograms, k sweep",
        description="Plots of slm train runs (their --save directories: metrics.jsonl, summary.json, "
        "selection_dumps/), as PNGs in --out: slm_vs_clm.png (held-out and training loss), "
        "selection_stats.png (selected fraction, excess loss of selected vs unselected tokens; SLM runs), "
        "excess_hist.png (excess-loss histograms per dump; SLM runs with selection_dumps/) and, with "
        "--k-sweep, k_sweep.png/.csv/.md (held-out loss vs k from each summary.json, CLM as a line). Needs "
        "matplotlib, the viz extra: pip install 'megatron_slm[viz]'. Library: megatron_slm/analysis/plots.py.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="[LABEL=]DIR",
        help="run directories (metrics.jsonl / summary.json), each DIR or LABEL=DIR (required, no default)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the PNGs (required, no default)")
    p.add_argument(
        "--k-sweep",
        action="store_true",
        help="also write the k-sweep report, k_sweep.png/.csv/.md (default: not written)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=PLOT_KINDS,
        help="only these plots (default: curves, selection, excess; with --k-sweep also sweep)",
    )
    p.add_argument(
        "--smooth",
        type=int,
        default=5,
        metavar="N",
        help="moving-average window of the training curves, in logged steps (default: 5)",
    )
    p.add_argument("--prefix", default="", help="prefix of the output file names (default: none)")


def _train(args, cfg) -> int:
    from megatron_slm.parallel import distributed
    from megatron_slm.training.run import run_train

    try:
        run_train(cfg)
    finally:
        distributed.destroy()
    return 0


def _check(args, cfg) -> int:
    """The resolution ``slm train`` runs (training/resolve.py: checkpoints, data, resume table, layout), then the
    memory plan of the layout as advice."""
    from megatron_slm.training.resolve import resolve_run

    cfg = resolve_run(cfg, world_size=args.world_size, require_data=False).config
    if not cfg.data.data_path:
        print(
            "note: no --data-path given: the data checks (vocabulary, token ids, tokenizer, score sidecars) "
            "run when it is",
            file=sys.stderr,
        )  # stdout holds the resolved config (JSON)
    print(json.dumps(cfg.to_dict(), indent=2))
    if args.world_size and cfg.model.vocab_size:  # the memory plan (slm plan) of this layout: a warning, not an error
        from megatron_slm.planning.plan import DEFAULT_PEAK_TFLOPS, make_plan

        try:
            plan = make_plan(
                cfg,
                args.world_size,
                gpu_memory_gib=args.gpu_memory,
                peak_tflops=cfg.train.peak_tflops or DEFAULT_PEAK_TFLOPS,
            )
        except Exception as exc:  # noqa: BLE001 - the plan is advice; the checks above decided
            print(f"warning: no memory plan ({type(exc).__name__}: {exc})", file=sys.stderr)
            return 0
        if not plan.fits():
            print(f"warning: {plan.fit_line()}; see 'slm plan --world-size {args.world_size}'", file=sys.stderr)
    return 0


def _count(text: str) -> int:
    """A count flag: an integer, also written 14_000_000_000 or 14e9."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"not a whole count: {text!r}")
    return int(value)


def _plan(args, cfg) -> int:
    """Memory and speed plan per GPU (megatron_slm/planning/plan.py), and with --scoring-tokens the plan of
    offline scoring; torch is imported here, not for --help."""
    from megatron_slm.planning.plan import (
        DEFAULT_PEAK_TFLOPS,
        format_plan,
        format_scoring_plan,
        make_plan,
        make_scoring_plan,
    )

    if not 0 < args.assumed_mfu <= 1 or args.gpu_memory <= 0:
        raise ConfigError(
            f"--assumed-mfu must be in (0, 1] and --gpu-memory > 0 (got {args.assumed_mfu}, {args.gpu_memory})"
        )
    peak = cfg.train.peak_tflops or DEFAULT_PEAK_TFLOPS
    plan = make_plan(
        cfg, args.world_size, gpu_memory_gib=args.gpu_memory, assumed_mfu=args.assumed_mfu, peak_tflops=peak
    )
    scoring = None
    if args.scoring_tokens is not None:
        G, s = cfg.train.global_batch_size, cfg.train.seq_length
        if args.scoring_tokens < G * s:
            raise ConfigError(f"--scoring-tokens {args.scoring_tokens:,} holds no global batch of {G} x {s} tokens")
        if (
            (args.scoring_documents is not None and args.scoring_documents < 1)
            or args.scoring_datasets < 1
            or args.scoring_disk_bandwidth <= 0
        ):
            raise ConfigError(
                f"--scoring-documents, --scoring-datasets and --scoring-disk-bandwidth must be "
                f"positive (got {args.scoring_documents}, {args.scoring_datasets}, "
                f"{args.scoring_disk_bandwidth})"
            )
        scoring = make_scoring_plan(
            cfg,
            args.world_size,
            args.scoring_tokens,
            documents=args.scoring_documents,
            datasets=args.scoring_datasets,
            assumed_mfu=args.assumed_mfu,
            peak_tflops=peak,
            disk_gbps=args.scoring_disk_bandwidth,
            gpu_memory_gib=args.gpu_memory,
        )
    print(format_plan(plan))
    if scoring is not None:
        print("\n" + format_scoring_plan(scoring))
    return 0


def _score(args, cfg) -> int:
    from megatron_slm.parallel import distributed
    from megatron_slm.scoring import score_reference

    try:
        score_reference(cfg, dtype=args.dtype, force=args.force)
    finally:
        distributed.destroy()
    return 0


def _eval_settings(args, cfg) -> dict:
    """What ``slm evaluate`` and ``slm dynamics`` record of how they ran (their windows and layout)."""
    from megatron_slm.parallel import distributed

    return {
        "seq_length": cfg.train.seq_length,
        "eval_samples": args.eval_samples,
        "tensor_model_parallel_size": cfg.parallel.tensor_model_parallel_size,
        "pipeline_model_parallel_size": cfg.parallel.pipeline_model_parallel_size,
        "world_size": distributed.world_size(),
    }


def _evaluate(args, cfg) -> int:
    """``slm evaluate`` (megatron_slm/analysis/evaluate.py); torch is imported here, not for --help."""
    import torch.distributed as dist

    from megatron_slm.analysis.evaluate import DEFAULT_SPLIT_RATIO, evaluate, format_table, write_outputs
    from megatron_slm.parallel import distributed

    try:
        rows = evaluate(
            cfg,
            args.eval_load,
            cfg.data.data_path or [],
            args.eval_samples,
            split_reference=args.split_reference,
            split_base=args.split_base,
            split_ratio=args.split_ratio,
        )
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(format_table(rows))
            settings = _eval_settings(args, cfg)
            if args.split_reference is not None:
                settings.update(
                    split_reference=args.split_reference,
                    split_base=args.split_base if args.split_base is not None else args.eval_load[0],
                    split_ratio=args.split_ratio if args.split_ratio is not None else DEFAULT_SPLIT_RATIO,
                )
            for note in write_outputs(rows, args.out, settings):
                print(note, file=sys.stderr)
            print(f"wrote {os.path.join(args.out, 'eval.json')}, eval.csv and eval_windows.npz (for slm compare)")
    finally:
        distributed.destroy()
    return 0


def _compare(args) -> int:
    """``slm compare`` (megatron_slm/analysis/compare.py): numpy only, over a saved ``slm evaluate``."""
    from megatron_slm.analysis import compare

    rows = compare.load_windows(args.eval_dir)
    result = compare.compare(
        rows,
        args.cmp_a,
        args.cmp_b,
        block=args.bootstrap_block_size,
        resamples=args.bootstrap_resamples,
        seed=args.seed,
        confidence=args.confidence,
    )
    print(compare.format_table(result))
    for note in compare.notes(result):
        print(note, file=sys.stderr)
    print(f"wrote {compare.write_compare(result, args.out or args.eval_dir, args.eval_dir)}")
    return 0


def _dynamics(args, cfg) -> int:
    """``slm dynamics`` (megatron_slm/analysis/dynamics.py); torch is imported when it measures, not for --help."""
    from megatron_slm.analysis import dynamics
    from megatron_slm.parallel import distributed

    runs = [dynamics.parse_run(spec) for spec in args.dyn_runs]  # syntax errors before any loading
    try:
        measured = dynamics.measure(
            cfg, runs, cfg.data.data_path or [], args.eval_samples, reference=args.dynamics_reference
        )
        if measured is not None:  # rank 0
            result = dynamics.analyse(measured, args.dynamics_threshold, args.dynamics_select_ratio)
            print(dynamics.format_table(result))
            settings = _eval_settings(args, cfg)
            notes = dynamics.write_outputs(result, args.out, settings)
            for note in notes:
                print(note, file=sys.stderr)
            files = "dynamics.csv" + ("" if notes else " and dynamics.png")
            print(f"wrote {os.path.join(args.out, 'dynamics.json')}, {files}")
    finally:
        distributed.destroy()
    return 0


def _reweight(args) -> int:
    """``slm reweight``: pure Python (megatron_slm/analysis/controls.py), no torch."""
    from megatron_slm.analysis.controls import explain, format_data_path, reweight

    if args.digits < 1:
        raise ConfigError(f"--digits must be at least 1 (got {args.digits})")
    result = reweight(args.run)
    print(format_data_path(result["prefixes"], result["matched"], args.digits))
    print(explain(result))
    return 0


def _preprocess(args) -> int:
    """``slm preprocess`` (megatron_slm/data/preprocess.py): no torch, no distributed setup. Exit status 2 with one
    ``error: ...`` line on unusable inputs, tokenizer or output prefix; 1 on an OS error; 130 when interrupted."""
    from megatron_slm.data.preprocess import preprocess

    try:
        preprocess(
            list(args.inputs) + list(args.input),
            args.output_prefix,
            args.tokenizer,
            json_key=args.json_key,
            workers=args.workers,
            force=args.force,
            append_eod=args.append_eod,
            log_every=args.log_every,
            split_lines=args.split_lines,
            eod_token=args.eod_token,
            quiet=args.quiet,
        )
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    return 0


def _convert(args) -> int:
    """``slm convert`` (megatron_slm/conversion/converters.py), one process; an error is one line, exit 2."""
    from megatron_slm.conversion.converters import hf_to_megatron, megatron_to_hf

    try:
        if args.direction == "hf-to-megatron":
            hf_to_megatron(
                args.input,
                args.output,
                dtype=args.dtype,
                verify=args.verify,
                force=args.force,
                verify_seq_len=args.verify_seq_len,
            )
        else:
            megatron_to_hf(
                args.input,
                args.output,
                dtype=args.dtype,
                force=args.force,
                hf_config=args.hf_config,
                tokenizer_model=args.tokenizer_model,
            )
    except SLMError as exc:  # the converters' messages may wrap lines: printed as one
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


def _viz(args) -> int:
    """``slm viz`` (megatron_slm/analysis/heatmap.py); source (b) builds the models on CPU in this process."""
    from megatron_slm.analysis import heatmap

    try:
        dumps = heatmap.selection_dumps(
            args.dump,
            args.policy,
            args.reference,
            args.text,
            args.tokenizer,
            k=args.k,
            seq_length=args.seq_length,
            scope=args.select_over,
        )
    except (FileNotFoundError, ValueError) as exc:  # SLMError's ValueErrors among them
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in heatmap.write_heatmap(
        dumps,
        args.out,
        tokenizer=args.tokenizer,
        title=args.title or heatmap.TITLES["dumps" if args.dump else "checkpoints"],
        max_sequences=args.max_sequences or None,
        max_tokens=args.max_tokens or None,
        max_dumps=args.max_dumps or None,
        vmax=args.vmax,
        layout=args.layout,
        ref_hard_loss=args.ref_hard_loss,
        png=args.png,
        png_dump=args.png_dump,
        png_sequences=args.png_sequences,
        png_tokens=args.png_tokens,
    ):
        print(line)
    return 0


def _plot(args) -> int:
    """``slm plot`` (megatron_slm/analysis/plots.py): no torch unless a run has selection dumps."""
    from megatron_slm.analysis import plots

    try:
        runs = [plots.load_run(path, label) for label, path in map(plots.parse_run_arg, args.runs)]
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    written, notes, report = plots.plot_runs(
        runs, args.out, kinds=args.only, k_sweep=args.k_sweep, smooth_window=args.smooth, prefix=args.prefix
    )
    for note in notes:
        print(note, file=sys.stderr)
    if report is not None:
        print(report, end="")
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.command in ("train", "score-reference"):  # before the seconds of imports: a stop signal then is kept
        from megatron_slm import lifecycle

        lifecycle.catch_stop_signals()
        lifecycle.exit_with_launcher()
    _default_threads()
    from megatron_slm.log import setup_logging

    try:
        if args.command == "demo":
            setup_logging("info")
            from megatron_slm import demo

            return demo.main(args)
        if args.command == "reweight":
            return _reweight(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "convert":
            setup_logging("info")
            return _convert(args)
        if args.command in ("preprocess", "viz", "plot"):
            from megatron_slm.log import filter_third_party_noise

            filter_third_party_noise()
            return {"preprocess": _preprocess, "viz": _viz, "plot": _plot}[args.command](args)
        cfg = load_config(args.config, args=args)
        setup_logging(cfg.train.logging_level, all_ranks=args.all_ranks_log)
        return {
            "train": _train,
            "check-config": _check,
            "plan": _plan,
            "score-reference": _score,
            "evaluate": _evaluate,
            "dynamics": _dynamics,
        }[args.command](args, cfg)
    except SLMError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into a reader that stopped early (`| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush stays quiet
        return 0


if __name__ == "__main__":
    sys.exit(main())
