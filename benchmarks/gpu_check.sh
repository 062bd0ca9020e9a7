#!/usr/bin/env bash
# The GPU checks of the benchmarks issue in one short run on a lent H100/H200 (the device tool), prepared on
# a CPU machine so that a session with a GPU spends its minutes measuring. Run on an H200 on 2026-12-04
# (benchmarks/RESULTS.md, section 5: ~4 minutes of device time).
#
#   here, once (CPU machine with PyPI):   bash benchmarks/gpu_check.sh fetch
#   there (one device call, carry .whl):  bash benchmarks/gpu_check.sh run
#
# The GPU machine has python3 with torch, numpy, pyyaml, psutil and sentencepiece but no registry:
# megatron-core and tqdm (a base dependency since the progress bars) travel as wheels in .whl/ (git-ignored), the
# project as its source tree (PYTHONPATH); the benchmarks run as modules from the repository root.
# Without TransformerEngine the model uses megatron-core's local layer spec with fused SDPA attention.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
fetch)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d .whl megatron-core==0.16.1 tqdm==4.70.1
  ls -la .whl
  ;;
run)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
  out=${OUT:-/tmp/gpu_check}
  mkdir -p "$out"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  # 0. Correctness on CUDA first: the fused head and one NCCL training step against plain autograd.
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/loss/test_selective_head.py \
    tests/test_parallel_training.py -k cuda 2>&1 | tee "$out/cuda_tests.log" || true  # the benchmarks run anyway
  # 1. ~1B Llama (TinyLlama-1.1B's shape) at sequence 2048 in bf16 on one GPU (NCCL, one rank): CLM, SLM with
  #    the online bf16 reference and SLM with offline scores; tokens/s and MFU.
  timeout 300 python3 -m benchmarks.bench_step_time --bf16 --layers 22 --hidden 2048 --ffn 5632 --heads 32 \
    --groups 4 --vocab 32000 --seq 2048 --mbs 1 --gbs 8 --warmup 2 --reps 5 2>&1 | tee "$out/step_time_1b.log" || true
  # 2. The selective CE (and fused head) vs megatron-core's on CUDA: 8192 tokens x 32000 vocab.
  timeout 200 python3 -m benchmarks.bench_selective_ce --tokens 8192 --hidden 2048 --warmup 3 --reps 10 2>&1 \
    | tee "$out/selective_ce.log" || true
  # 3. Activation recompute (none / selective / full) at the same 1B shape in bf16: step time and saved bytes.
  timeout 240 python3 -m benchmarks.bench_recompute --bf16 --layers 22 --hidden 2048 --ffn 5632 --heads 32 \
    --groups 4 --vocab 32000 --seq 2048 --mbs 1 --gbs 4 --warmup 1 --reps 3 2>&1 | tee "$out/recompute_1b.log" || true
  # 4. The plan for the shipped 7B config, to compare with what a GPU run measures. (The distributed optimizer
  #    and the interleaved pipeline need several GPUs: their equality tests run on CPU/gloo in tests/training/.)
  python3 -m megatron_slm.cli plan --config launch/configs/mistral7b_owm_slm_k0.7.yaml --world-size 8 2>&1 \
    | tee "$out/plan_7b.log" || true
  ;;
*)
  echo "usage: bash benchmarks/gpu_check.sh fetch|run" >&2
  exit 2
  ;;
esac
