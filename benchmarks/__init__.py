"""Benchmarks of megatron_slm, each a script run as a module from the repository root:

    .venv/bin/python -m benchmarks.bench_step_time [--help]

Results and how they were measured: benchmarks/RESULTS.md.
"""
