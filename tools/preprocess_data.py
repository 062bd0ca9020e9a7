#!/usr/bin/env python
"""Tokenize text into a megatron-core indexed dataset (<prefix>.bin/.idx + <prefix>.json). Inputs: .jsonl/.json
and .txt (each also .gz / .zst), .parquet, .arrow, and directories written by `datasets` (save_to_disk, or a
load_dataset cache of one split); the text field or column is --json-key.

    python tools/preprocess_data.py data/*.jsonl --tokenizer tokenizer.model --output-prefix data/train \
        [--workers 2] [--json-key text] [--split-lines] [--force] [--quiet]
    python tools/preprocess_data.py data/fineweb/*.parquet hf_saved_dataset/ ... --json-key text

The logic lives in megatron_slm.data.preprocess (importable: ``preprocess(inputs, output_prefix,
tokenizer_path, ...)``); this file is its command line. Exit status 2 with one ``error: ...`` line on
unusable inputs, tokenizer or output prefix.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_slm.data.preprocess import PreprocessError, main, preprocess  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
