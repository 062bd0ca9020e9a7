#!/usr/bin/env python
"""The old name of ``slm preprocess``: ``python tools/preprocess_data.py ARGS`` runs ``slm preprocess ARGS`` (megatron_slm/cli.py)."""

import sys

from megatron_slm.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
