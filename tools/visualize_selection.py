#!/usr/bin/env python
"""The old name of ``slm viz``: ``python tools/visualize_selection.py ARGS`` runs ``slm viz ARGS`` (megatron_slm/cli.py)."""

import sys

from megatron_slm.cli import main

if __name__ == "__main__":
    sys.exit(main(["viz", *sys.argv[1:]]))
