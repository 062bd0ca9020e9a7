#!/usr/bin/env python
"""Offline reference scores for SLM: a per-token sidecar aligned with each training dataset.

    torchrun --nproc-per-node 4 tools/score_reference.py --config run.yaml --ref-load REF_CKPT \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 [--dtype bf16] [--force]

Use the training run's data flags (data path, split, seed, seq length, global batch, train iters); then train
with --reference-mode offline. Interrupted runs resume. Same as `slm score-reference`; see
megatron_slm/scoring.py.
"""

import sys

from megatron_slm.cli import main

if __name__ == "__main__":
    sys.exit(main(["score-reference", *sys.argv[1:]]))
