"""Seeing what SLM does: per-token selection heatmaps (HTML, PNG) and training-run plots.

- :mod:`megatron_slm.viz.heatmap` -- each token coloured by its excess loss (policy - reference), the
  selected ones marked, losses on hover; from the trainer's selection dumps or computed from checkpoints.
- :mod:`megatron_slm.viz.plots` -- SLM vs CLM loss curves, selection statistics, excess-loss histograms and
  a k-sweep report from run directories (``metrics.jsonl``, ``summary.json``, ``selection_dumps/``).

CLIs: ``tools/visualize_selection.py`` and ``tools/plot_runs.py``. Plots need matplotlib (test extra).
"""

from megatron_slm.viz.heatmap import (  # noqa: F401
    compute_selection,
    load_dumps,
    render_html,
    render_png,
    token_texts,
)
