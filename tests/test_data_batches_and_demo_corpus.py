"""micro_batches (which samples each DP rank trains on) and the demo corpus (indexed datasets)."""

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_slm.data.batches import micro_batches

EOD = 2


@pytest.mark.unit
def test_micro_batches_partition_the_global_batch():
    samples = [{"tokens": torch.tensor([i, i]), "dataset_id": np.int16(i % 3)} for i in range(100)]
    G, mbs, dp = 8, 2, 2
    for step in range(4):
        per_rank = [micro_batches(samples, step, G, mbs, r, dp) for r in range(dp)]
        got = [int(t) for batches in per_rank for mb in batches for t in mb["tokens"][:, 0]]
        assert got == list(range(step * G, (step + 1) * G))  # rank r holds the r-th contiguous part, in order
        assert all(mb["tokens"].shape == (mbs, 2) and mb["dataset_id"].shape == (mbs,) for b in per_rank for mb in b)
    single = micro_batches(samples, 3, G, 4, 0, 1)  # DP=1, other micro-batch size: same samples, same order
    assert torch.cat([mb["tokens"] for mb in single]).tolist() == [[i, i] for i in range(24, 32)]
    with pytest.raises(ValueError, match="divisible"):
        micro_batches(samples, 0, 10, 2, 0, 4)
    with pytest.raises(ValueError, match="dp_rank"):
        micro_batches(samples, 0, 8, 2, 2, 2)


def test_demo_corpus_builds_indexed_datasets_equal_to_sentencepiece(tmp_path):
    import sentencepiece as spm

    from megatron_slm.data.demo_corpus import build_demo_corpus, collect_documents

    caps = dict(seed=0, max_math_chars=60_000, max_general_chars=60_000)
    summary = build_demo_corpus(tmp_path, vocab_size=512, **caps)
    texts = collect_documents(**caps)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert summary["vocab_size"] == sp.get_piece_size() == 512 and sp.eos_id() == EOD

    decoded = {}
    for name in ("math_ref_train", "math_train", "math_heldout", "general"):
        ds = IndexedDataset(str(tmp_path / name))
        assert len(ds) == summary["files"][name]["documents"] > 0
        docs = [ds[i].tolist() for i in range(len(ds))]
        assert all(d[-1] == EOD for d in docs)
        for d in docs[:3]:  # against sentencepiece run directly on the decoded text
            text = sp.decode(d[:-1])
            assert len(text) >= 80 and sp.encode(text) + [EOD] == d
        decoded[name] = {sp.decode(d[:-1]) for d in docs}

    math_files = ("math_ref_train", "math_train", "math_heldout")
    assert set().union(*(decoded[n] for n in math_files)) == set(texts["math"])  # exact text round trip
    assert not decoded["math_heldout"] & (decoded["math_train"] | decoded["math_ref_train"])
    assert not decoded["math_train"] & decoded["math_ref_train"]
    assert decoded["general"] <= set(texts["general"]) and not decoded["general"] & set(texts["math"])
    assert 0.45 <= summary["math_fraction_of_policy_data"] <= 0.65


@pytest.mark.unit
def test_to_device_moves_tensors_in_place():
    """Micro-batches reach the model's device (CUDA on GPU); the caller's dicts see the moved tensors."""
    from megatron_slm.data.batches import to_device

    mbs = [{"tokens": torch.arange(6).view(2, 3), "name": "x"}, {"tokens": torch.zeros(2, 3)}]
    same = [id(mb) for mb in mbs]
    out = to_device(mbs, torch.device("meta"))
    assert out is mbs and [id(mb) for mb in mbs] == same
    assert all(mb["tokens"].device.type == "meta" for mb in mbs) and mbs[0]["name"] == "x"
    assert to_device(mbs, torch.device("meta"))[0]["tokens"] is mbs[0]["tokens"]  # already there: untouched
