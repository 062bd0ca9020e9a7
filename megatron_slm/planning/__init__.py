"""What a run costs before it runs, from its config alone.

- ``flops``: model FLOPs of a training step (the training log's TFLOP/s and MFU);
- ``plan``: ``slm plan``, per-rank parameters (the real model slices, built on the meta device), memory and speed
  of a layout.
"""
