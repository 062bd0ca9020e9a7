#!/usr/bin/env python
"""The old name of ``slm plot``: ``python tools/plot_runs.py ARGS`` runs ``slm plot ARGS`` (megatron_slm/cli.py)."""

import sys

from megatron_slm.cli import main

if __name__ == "__main__":
    sys.exit(main(["plot", *sys.argv[1:]]))
