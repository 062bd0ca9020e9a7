"""The command line of tools/convert_checkpoint.py: ``hf-to-megatron`` and ``megatron-to-hf``; every
user-facing failure is one ``error: ...`` line and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys

from megatron_slm.conversion.converters import DTYPES, hf_to_megatron, megatron_to_hf
from megatron_slm.errors import ConvertError, SLMError
from megatron_slm.log import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Convert transformers Llama/Mistral directories to megatron_slm checkpoints and back.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-megatron", help="transformers directory -> megatron_slm checkpoint (loads at any TP/PP)")
    a.add_argument("--input", required=True, help="transformers model directory (config.json + weights)")
    a.add_argument("--output", required=True, help="checkpoint directory to write (use with --ref-load / --load)")
    a.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    a.add_argument("--verify", action="store_true", help="compare logits with transformers (fp32) after converting")
    a.add_argument("--verify-seq-len", type=int, default=64, help="tokens per sequence for --verify")
    a.add_argument("--force", action="store_true", help="replace an existing output (never an input)")
    b = sub.add_parser("megatron-to-hf", help="megatron_slm checkpoint (any TP/PP) -> transformers directory")
    b.add_argument("--input", required=True, help="checkpoint directory written by save_model_weights")
    b.add_argument("--output", required=True, help="transformers directory to write")
    b.add_argument(
        "--dtype",
        choices=sorted(DTYPES) + ["auto"],
        default="auto",
        help="dtype of the written weights (auto: the dtype the checkpoint was converted in, else fp32)",
    )
    b.add_argument(
        "--hf-config",
        default=None,
        metavar="PATH",
        help="config.json (or HF directory) whose token ids/model type to keep, for checkpoints that were "
        "not written by hf-to-megatron",
    )
    b.add_argument(
        "--tokenizer-model",
        default=None,
        metavar="PATH",
        help="tokenizer to write next to the weights, so that AutoTokenizer and lm-eval load the output: a "
        "sentencepiece .model, a tokenizer.json or an HF directory holding one; it must be the "
        "tokenizer the checkpoint records (sha256). Default: the tokenizer files hf-to-megatron kept, "
        "if any (else only the weights are written, with a warning)",
    )
    b.add_argument("--force", action="store_true", help="replace an existing output (never an input)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("info")
    try:
        if args.command == "hf-to-megatron":
            if args.verify_seq_len < 1:
                raise ConvertError("--verify-seq-len must be >= 1")
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
    except SLMError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
