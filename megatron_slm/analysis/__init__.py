"""After-the-fact analysis of runs and checkpoints; nothing here takes part in training.

- ``evaluate``: ``slm evaluate``, loss/perplexity of checkpoints on fixed, seed-independent windows (and the
  learnable / not-learnable split), and their per-window sums (eval_windows.npz);
- ``compare``: ``slm compare``, the paired loss difference of two evaluated checkpoints with block bootstrap
  intervals, per dataset, split part and quarter (numpy only, no torch);
- ``dynamics``: ``slm dynamics``, token loss classes H->H, L->H, H->L, L->L over a run's checkpoints;
- ``controls``: ``slm reweight``, the CLM blend that sees an SLM run's token mix (pure Python, no torch);
- ``heatmap``: per-token selection heatmaps (HTML, PNG) from selection dumps;
- ``text_selection``: the same dumps computed from a policy and a reference checkpoint on some text;
- ``plots``: SLM vs CLM loss curves, selection statistics, excess-loss histograms and k sweeps from run directories.

CLIs: ``slm evaluate|compare|dynamics|reweight|viz|plot``. Plots need matplotlib, the ``viz`` extra
(pip install 'megatron_slm[viz]'). Nothing is imported here: ``slm reweight`` must not import torch.
"""
