#!/usr/bin/env python
"""Convert transformers Llama/Mistral directories to megatron_slm checkpoints and back.

    python tools/convert_checkpoint.py hf-to-megatron --input HF_DIR --output CKPT [--dtype bf16] [--verify] [--force]
    python tools/convert_checkpoint.py megatron-to-hf --input CKPT --output HF_DIR [--dtype auto|fp32|bf16] [--force] \
        [--tokenizer-model TOKENIZER]

The logic lives in megatron_slm.conversion (importable from megatron_slm.conversion.converters:
``hf_to_megatron``, ``megatron_to_hf``, ``verify_conversion``); this file runs its command line
(megatron_slm.conversion.cli). Runs as one process (no torchrun); the checkpoint it
writes loads at any TP/PP (``--ref-load CKPT``). Exit status 2 with one ``error: ...`` line on unusable
inputs or outputs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_slm.conversion.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
