#!/usr/bin/env python
"""The old name of ``slm convert``: ``python tools/convert_checkpoint.py ARGS`` runs ``slm convert ARGS`` (megatron_slm/cli.py)."""

import sys

from megatron_slm.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
