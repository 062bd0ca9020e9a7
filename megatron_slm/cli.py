"""The one CLI: ``slm train | check-config | plan | score-reference | evaluate | dynamics | reweight | demo``. It parses and dispatches, nothing more.

    torchrun --nproc-per-node 4 -m megatron_slm.cli train --config cfg.yaml --tensor-model-parallel-size 2

Every config flag comes from the config dataclasses' field metadata (megatron_slm.config). Nothing here
imports torch until a command runs, so ``--help`` answers at once.
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
# not read is loaded and left unused.
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
    "dynamics": "slm dynamics --run slm=runs/slm --run clm=runs/clm --data-path data/math_valid \\\n"
    "    --seq-length 512 --eval-samples 200 --out dynamics_out",
    "demo": "slm demo --out demo_out --nproc 4",
}


def _command(sub, name: str, help: str, description: str, formatter=_HelpFormatter) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=help, description=description, epilog="example:\n  " + EXAMPLES[name], formatter_class=formatter
    )


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
    return parser


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
            print(f"wrote {os.path.join(args.out, 'eval.json')} and eval.csv")
    finally:
        distributed.destroy()
    return 0


def _dynamics(args, cfg) -> int:
    """``slm dynamics`` (megatron_slm/analysis/dynamics.py); torch is imported when it measures, not for --help."""
    from megatron_slm.analysis import dynamics
    from megatron_slm.parallel import distributed

    runs = [dynamics.parse_run(spec) for spec in args.dyn_runs]  # syntax errors before any loading
    try:
        measured = dynamics.measure(cfg, runs, cfg.data.data_path or [], args.eval_samples)
        if measured is not None:  # rank 0
            result = dynamics.analyse(measured, args.dynamics_threshold)
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
