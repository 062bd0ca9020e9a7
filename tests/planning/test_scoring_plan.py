"""slm plan's offline-scoring section (planning/plan.py: make_scoring_plan, format_scoring_plan): every number
against a hand count written out here from the model shape, the token count and the byte layout of what
slm score-reference writes, and the byte counts against files written the way scoring.py and data/scores.py
write them."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from megatron_slm.cli import main
from megatron_slm.config import load_config
from megatron_slm.loss.vocab_parallel_ce import _HEAD_BLOCK_BYTES
from megatron_slm.planning.plan import PART_CONTAINER_BYTES, make_scoring_plan

pytestmark = pytest.mark.unit

MISTRAL_CONFIG = "launch/configs/mistral7b_owm_slm_k0.7.yaml"
GiB = 1 << 30

# The test's layout: TP=2 x PP=2 on 8 GPUs -> DP=2; micro-batch 2, global batch 16, seq 64 -> 4 micro-batches per
# DP rank and step. The reference (2 layers, hidden 32, FFN 96, 4 heads / 2 KV groups) differs from the policy:
# the plan must take the reference's shape; its vocabulary (1000) is the policy's, padded to 128 x TP = 256 -> 1024.
TP, PP, WORLD, DP = 2, 2, 8, 2
B, G, S = 2, 16, 64
M = G // (B * DP)  # 4
H, F, HEADS, GROUPS, LAYERS, V_PAD = 32, 96, 4, 2, 2, 1024
KV = GROUPS * H // HEADS  # 16
TOKENS, DOCS, DATASETS = 100_000, 321, 2
MFU, PEAK, DISK = 0.5, 100.0, 2.0


def _cfg():
    return load_config(
        overrides=dict(
            model=dict(
                num_layers=4,
                hidden_size=64,
                ffn_hidden_size=160,
                num_attention_heads=4,
                num_query_groups=2,
                vocab_size=1000,
                max_position_embeddings=S,
            ),
            reference=dict(
                model=dict(
                    num_layers=LAYERS,
                    hidden_size=H,
                    ffn_hidden_size=F,
                    num_attention_heads=HEADS,
                    num_query_groups=GROUPS,
                ),
                dtype="bf16",
            ),
            parallel=dict(tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP),
            train=dict(micro_batch_size=B, global_batch_size=G, seq_length=S, train_iters=1),
        )
    )


@pytest.fixture(scope="module")
def plan():
    return make_scoring_plan(
        _cfg(), WORLD, TOKENS, documents=DOCS, datasets=DATASETS, assumed_mfu=MFU, peak_tflops=PEAK, disk_gbps=DISK
    )


def test_samples_and_time(plan):
    iters = 100_000 // (16 * 64)  # 97 steps of 1,024 tokens
    assert iters == 97 and plan.train_iters == 97
    assert plan.samples == 97 * 16 and plan.scored_tokens == 97 * 16 * 64 == 99_328
    # One forward of the reference per token: 2 FLOPs per weight of every matmul (Q, K, V, O; gate, up, down; the
    # output layer over the padded vocabulary) plus the attention scores and values, 2 x 2 x s x h per layer.
    matmul_weights = H * H + H * KV + H * KV + H * H + 3 * H * F  # 12,288 per layer
    per_token = LAYERS * (2 * matmul_weights + 2 * 2 * S * H) + 2 * H * V_PAD
    assert per_token == 131_072 and plan.flops_per_token == per_token and plan.flops == per_token * 99_328
    bubble = (PP - 1) / M  # forward-only pipeline: PP - 1 stage slots of M micro-batches
    assert plan.bubble == 0.25
    wall = 99_328 * 131_072 / (8 * 100e12 * 0.5) * 1.25
    assert plan.wall_seconds == pytest.approx(wall, rel=1e-12)
    assert plan.step_time == pytest.approx(wall / 97, rel=1e-12)
    assert plan.gpu_hours == pytest.approx(wall * 8 / 3600, rel=1e-12)
    assert plan.bubble == bubble


def test_memory_per_gpu(plan):
    # the reference's slice per rank (TP=2 halves every matrix, norms replicated; one layer per stage)
    layer = H + (H + 2 * KV) * H // TP + H * H // TP + H + 2 * F * H // TP + F * H // TP  # 6,208
    embedding = V_PAD // TP * H  # 16,384: the first stage's; the last stage's output layer is as large
    first, last = embedding + layer, layer + H + embedding
    assert [st.reference_params for st in plan.stages] == [first, last] == [22_592, 22_624]
    tokens = S * B
    for st, params, is_last in zip(plan.stages, (first, last), (False, True)):
        assert st.weights == 2 * params  # bf16 (--ref-dtype bf16)
        # the step's micro-batches: tokens, labels, position ids (int64) and loss mask (fp32); their fp32 scores
        assert st.data == M * tokens * (8 + 8 + 8 + 4 + (4 if is_last else 0))
        # forward-only working set: one layer (residual + normed input 2 h e, SwiGLU 5 f e / TP, stage in/out
        # 2 h e), or on the last stage the head's block of logits (all rows fit the 1 GiB block budget here)
        layer_ws = tokens * (2 * H * 2 + 5 * F * 2 / TP) + 2 * tokens * H * 2
        part = V_PAD // TP
        rows = min(tokens, max(8, _HEAD_BLOCK_BYTES["cuda"] // (4 * part)))
        head_ws = tokens * H * 2 + rows * part * (2 + 4) + tokens * 12
        assert st.forward_only == (max(layer_ws, head_ws) if is_last else layer_ws)
        assert st.reserve == 3 * GiB
        assert st.total == st.weights + st.data + st.forward_only + 3 * GiB
    assert plan.total_memory() == plan.stages[1].total


def test_disk_bytes(plan):
    # sidecars: 4 / 2 bytes per token; .idx per dataset: 34 header bytes, int32 length + int64 pointer per
    # sequence (one per document) and int64 document boundaries (documents + 1)
    idx = sum(34 + 12 * d + 8 * (d + 1) for d in (160, 161))  # the 321 documents, over the 2 datasets
    assert idx == 2 * 42 + 20 * 321 == 6_504 and plan.sidecar_index == idx
    assert plan.sidecar_bytes("fp32") == 400_000 + idx and plan.sidecar_bytes("bf16") == 200_000 + idx
    # parts: one per step and DP rank, G / DP = 8 samples each: an int16 dataset id (a blend), 64 int64 label
    # positions and 64 fp32 scores per sample, in torch.save's container
    per_part = 8 * (2 + 64 * 8 + 64 * 4) + PART_CONTAINER_BYTES
    assert plan.num_parts == 97 * 2 and plan.samples_per_part == 8 and plan.part_bytes == per_part == 8_630
    assert plan.parts_bytes == 194 * 8_630 == 1_674_220
    # merge: the fp32 flat memmap per dataset (+ 128-byte .npy header), written once and read once; parts read
    # once; four reads of an index (two checksums of the token index and its arrays, one of the new index)
    flat = 4 * 100_000 + 128 * 2
    assert plan.flat_bytes == flat
    assert plan.merge_read == {"fp32": 1_674_220 + flat + 4 * idx, "bf16": 1_674_220 + flat + 4 * idx}
    assert plan.merge_write == {"fp32": flat + 400_000 + idx, "bf16": flat + 200_000 + idx}
    assert plan.merge_seconds("fp32") == (1_674_220 + flat + 4 * idx + flat + 400_000 + idx) / 2e9
    assert plan.disk_peak("bf16") == 1_674_220 + flat + 200_000 + idx


@pytest.mark.parametrize("datasets", [1, 3])
def test_part_bytes_match_a_saved_part(tmp_path, datasets):
    """A part as score_reference saves it (scoring.py): the prediction within torch.save's alignment padding."""
    cfg = _cfg()
    sp = make_scoring_plan(cfg, WORLD, TOKENS, datasets=datasets)
    rows = sp.samples_per_part
    # a BlendedDataset gives an int16 dataset id per sample (stacked, concatenated); one dataset: torch.long zeros
    ids = (
        torch.stack([torch.as_tensor(np.int16(1)) for _ in range(rows)])
        if datasets > 1
        else torch.zeros(rows, dtype=torch.long)
    )
    part = {
        "dataset_id": ids,
        "label_positions": torch.arange(rows * S, dtype=torch.int64).reshape(rows, S),
        "scores": torch.rand(rows, S, dtype=torch.float32),
    }
    first = 123 * G
    path = tmp_path / f"samples{first:012d}-{first + rows:012d}.pt"
    torch.save(part, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    assert sp.dataset_id_bytes == (2 if datasets > 1 else 8)
    assert abs(path.stat().st_size - sp.part_bytes) <= 64, (path.stat().st_size, sp.part_bytes)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sidecar_bytes_match_a_written_sidecar(tmp_path, dtype):
    """A sidecar written by data/scores.py over a token dataset of one sequence per document (preprocessing's)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_slm.data.scores import write_sidecar

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, size=37)
    prefix = str(tmp_path / "tok")
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for n in lengths:
        builder.add_document(torch.from_numpy(rng.integers(0, 1000, size=n).astype(np.uint16)), [int(n)])
    builder.finalize(f"{prefix}.idx")
    n_tokens = int(lengths.sum())
    out = str(tmp_path / "tok_refscores")
    write_sidecar(out, prefix, rng.random(n_tokens).astype(np.float32), dtype, {})
    cfg = load_config(
        overrides=dict(
            model=dict(preset="tiny", vocab_size=1000),
            train=dict(micro_batch_size=1, global_batch_size=1, seq_length=8),
        )
    )
    sp = make_scoring_plan(cfg, 1, n_tokens, documents=37)
    assert os.path.getsize(f"{out}.bin") == sp.sidecar_values[dtype] == n_tokens * (4 if dtype == "fp32" else 2)
    assert os.path.getsize(f"{out}.idx") == sp.sidecar_index == 42 + 20 * 37
    assert sp.sidecar_bytes(dtype) == os.path.getsize(f"{out}.bin") + os.path.getsize(f"{out}.idx")


def test_documents_assumed_when_not_given():
    sp = make_scoring_plan(_cfg(), WORLD, TOKENS)
    assert sp.documents == 100 and sp.documents_assumed  # one per 1,000 tokens
    assert sp.sidecar_index == 42 + 20 * 100 and sp.dataset_id_bytes == 8


def test_cli_scoring_section_for_mistral_7b(capsys):
    """The numbers of docs/recipe.md: Mistral-7B (the shipped config: TP=2 x PP=1, global batch 256 x 4096, bf16
    reference) scoring a 14B-token corpus on 64 GPUs (DP=32)."""
    assert main(["plan", "--config", MISTRAL_CONFIG, "--world-size", "64", "--scoring-tokens", "14e9"]) == 0
    out = capsys.readouterr().out
    iters = 14_000_000_000 // (256 * 4096)
    scored = iters * 256 * 4096
    assert iters == 13_351 and scored == 13_999_538_176
    h, f, kv, s, layers, vocab = 4096, 14336, 8 * 128, 4096, 32, 32000  # vocab 32000: a multiple of 128 x 2
    per_token = layers * (2 * (2 * h * h + 2 * h * kv + 3 * h * f) + 4 * s * h) + 2 * h * vocab
    assert per_token == 16_368_271_360
    wall = scored * per_token / (64 * 989e12 * 0.40)  # PP=1: no bubble
    parts = iters * 32
    part = 256 // 32 * (8 + 4096 * 12) + PART_CONTAINER_BYTES  # 8 samples, int64 dataset id (one dataset)
    sidecar_fp32 = 4 * 14_000_000_000 + 42 + 20 * 14_000_000  # documents assumed: one per 1,000 tokens
    flat = 4 * 14_000_000_000 + 128
    idx = 42 + 20 * 14_000_000
    merge_fp32 = (parts * part + flat + 4 * idx) + (flat + sidecar_fp32)
    section = out[
        out.index(
            "offline scoring (slm score-reference) of 14,000,000,000 tokens (1 dataset) on 64 GPUs, "
            "TP=2 x PP=1 x DP=32:"
        ) :
    ]
    for text in [
        f"--train-iters {iters:,} = floor(14,000,000,000 / (256 x 4096)): 3,417,856 samples, {scored:,} tokens scored",
        f"forward only: {per_token:,} FLOPs per token",
        f"time: {wall / 3600:.2f} h on 64 GPUs = {wall * 64 / 3600:,.1f} GPU-hours",
        "at an assumed MFU 0.40",
        f"sidecars over all 14,000,000,000 tokens: fp32 {sidecar_fp32 / 1e9:.2f} GB, bf16 "
        f"{(sidecar_fp32 - 2 * 14_000_000_000) / 1e9:.2f} GB",
        "14,000,000 documents assumed",
        f"{parts * part / 1e9:,.2f} GB",
        f"{parts:,} files (13,351 steps x 32 DP ranks) of {part:,} B",
        f"--dtype fp32: reads {(parts * part + flat + 4 * idx) / 1e9:,.2f} GB",
        f"{merge_fp32 / 1e9 / 60:.1f} min",
        "at an assumed 1 GB/s",
        "memory per GPU (every rank)",
        "FITS in 80 GiB",
    ]:
        assert text in section, (text, section)
    assert (wall / 3600, wall * 64 / 3600, parts * part / 1e9) == pytest.approx((2.514, 160.9, 169.08), abs=5e-3)


def test_cli_scoring_section_only_with_tokens(capsys, tmp_path):
    assert main(["plan", "--config", MISTRAL_CONFIG, "--world-size", "32"]) == 0
    assert "offline scoring" not in capsys.readouterr().out
    assert main(["plan", "--config", MISTRAL_CONFIG, "--world-size", "32", "--scoring-tokens", "1000"]) == 2
    assert "holds no global batch of 256 x 4096 tokens" in capsys.readouterr().err
