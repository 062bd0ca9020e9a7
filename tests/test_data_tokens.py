import json

import numpy as np
import pytest
import torch

from megatron_slm.data.tokens import DataError, TokenFile, TokenSamples, micro_batches, write_token_file

EOD = 2


def _write(tmp_path, docs, vocab=100, name="toks"):
    write_token_file(tmp_path / name, docs, EOD, vocab, tokenizer="tok.model")
    return tmp_path / name


def test_round_trip(tmp_path):
    prefix = _write(tmp_path, [[5, 6, 7], [8], [9, 10]])
    tf = TokenFile(prefix)
    assert tf.tokens.tolist() == [5, 6, 7, 2, 8, 2, 9, 10, 2]
    assert tf.tokens.dtype == np.int32 and (tf.eod_id, tf.vocab_size, tf.num_documents) == (2, 100, 3)
    meta = json.loads((tmp_path / "toks.json").read_text())
    assert meta["num_tokens"] == 9 and meta["tokenizer"] == "tok.model"
    assert TokenFile(tmp_path / "toks.npy").tokens.tolist() == tf.tokens.tolist()  # a file name works too


def test_write_rejects_out_of_range_ids(tmp_path):
    with pytest.raises(DataError, match="vocabulary|token ids"):
        write_token_file(tmp_path / "bad", [[5, 100]], EOD, 100, None)


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_file_rejected(tmp_path, verify):
    prefix = _write(tmp_path, [list(range(3, 50))] * 3)
    npy = tmp_path / "toks.npy"
    npy.write_bytes(npy.read_bytes()[:-6])
    with pytest.raises(DataError, match="toks") as err:
        TokenFile(prefix, verify=verify)
    assert "demo_corpus" in str(err.value)


def test_modified_byte_rejected_by_checksum(tmp_path):
    prefix = _write(tmp_path, [[5, 6, 7], [8, 9]])
    npy = tmp_path / "toks.npy"
    data = bytearray(npy.read_bytes())
    assert data[-4] == EOD  # the final EOD, little-endian int32
    data[-4] = 3  # still a valid id: only the checksum can notice
    npy.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256"):
        TokenFile(prefix)
    assert TokenFile(prefix, verify=False).tokens[-1] == 3


def test_ids_outside_vocab_rejected(tmp_path):
    prefix = _write(tmp_path, [[5, 60, 7]])
    meta_path = tmp_path / "toks.json"
    meta = json.loads(meta_path.read_text())
    meta["vocab_size"] = 50
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="outside the vocabulary"):
        TokenFile(prefix)


def test_missing_and_mismatched_metadata(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        TokenFile(tmp_path / "nothing")
    prefix = _write(tmp_path, [[5, 6]])
    np.save(tmp_path / "toks.npy", np.array([5, 6, 2, 7, 2], dtype=np.int32))
    with pytest.raises(DataError, match="says 3"):
        TokenFile(prefix, verify=False)
    np.save(tmp_path / "toks.npy", np.array([5, 6, 2], dtype=np.int64))
    with pytest.raises(DataError, match="int32"):
        TokenFile(prefix, verify=False)


def test_token_samples_are_the_raw_windows(tmp_path):
    rng = np.random.default_rng(123)
    docs = [rng.integers(3, 50, size=rng.integers(1, 12)).tolist() for _ in range(40)]
    raw = np.concatenate([d + [EOD] for d in docs])
    s = 7
    samples = TokenSamples(_write(tmp_path, docs), seq_length=s, seed=5)
    n = (len(raw) - 1) // s
    assert len(samples) == n
    windows = {tuple(raw[k * s:k * s + s + 1]): k for k in range(n)}
    assert len(windows) == n  # random data: every window is distinct, so a sample identifies its window
    for epoch in range(2):
        seen = []
        for i in range(epoch * n, (epoch + 1) * n):
            x = samples[i]
            assert x["tokens"].dtype == x["labels"].dtype == x["position_ids"].dtype == torch.int64
            assert x["loss_mask"].dtype == torch.float32
            chunk = tuple(x["tokens"].tolist() + x["labels"][-1:].tolist())
            assert x["labels"][:-1].tolist() == x["tokens"][1:].tolist()
            seen.append(windows[chunk])
            assert x["loss_mask"].tolist() == [0.0 if t == EOD else 1.0 for t in chunk[:-1]]
            assert x["position_ids"].tolist() == list(range(s))
        assert sorted(seen) == list(range(n))  # every window exactly once per epoch
        assert seen == np.random.default_rng(5 + epoch).permutation(n).tolist()
    assert 0.0 in torch.cat([samples[i]["loss_mask"] for i in range(n)]).tolist()
    with pytest.raises(DataError, match="too few"):
        TokenSamples(_write(tmp_path, [[5, 6]], name="tiny"), seq_length=8)


def _first_tokens(batches):
    return [int(t) for mb in batches for t in mb["tokens"][:, 0]]


def test_micro_batches_partition_the_global_batch(tmp_path):
    s, G, mbs, dp = 4, 8, 2, 2
    prefix = _write(tmp_path, [list(range(3, 3 + 4 * 20))], vocab=200)  # 81 tokens -> 20 windows
    samples = TokenSamples(prefix, seq_length=s, seed=1)
    n = len(samples)
    order = np.concatenate([np.random.default_rng(1 + e).permutation(n) for e in range(3)])
    raw = TokenFile(prefix).tokens
    covered = []
    for step in range(5):  # 40 samples: crosses into the second epoch
        per_rank = [micro_batches(samples, step, G, mbs, r, dp) for r in range(dp)]
        for batches in per_rank:
            assert len(batches) == G // dp // mbs
            assert all(mb["tokens"].shape == (mbs, s) and mb["loss_mask"].shape == (mbs, s) for mb in batches)
        got = [t for batches in per_rank for t in _first_tokens(batches)]
        expected = [int(raw[w * s]) for w in order[step * G:(step + 1) * G]]
        assert got == expected  # rank r holds the r-th contiguous part, in order
        covered += got
    first_epoch = covered[:n]
    assert sorted(first_epoch) == sorted(int(raw[w * s]) for w in range(n))  # no overlap within an epoch

    again = micro_batches(TokenSamples(prefix, seq_length=s, seed=1), 3, G, mbs, 1, dp)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(again, micro_batches(samples, 3, G, mbs, 1, dp)))
    other = micro_batches(TokenSamples(prefix, seq_length=s, seed=2), 0, G, mbs, 0, dp)
    assert _first_tokens(other) != _first_tokens(micro_batches(samples, 0, G, mbs, 0, dp))
    with pytest.raises(ValueError, match="divisible"):
        micro_batches(samples, 0, 10, 2, 0, 4)
    with pytest.raises(ValueError, match="dp_rank"):
        micro_batches(samples, 0, 8, 2, 2, 2)


def _documents(tokens, eod):
    return [tuple(part[:-1].tolist()) for part in np.split(tokens, np.flatnonzero(tokens == eod) + 1)[:-1]]


def test_demo_corpus(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from megatron_slm.data.demo_corpus import build_demo_corpus, collect_documents

    caps = dict(seed=0, max_math_chars=60_000, max_general_chars=60_000)
    summary = build_demo_corpus(tmp_path, vocab_size=512, **caps)
    texts = collect_documents(**caps)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert summary["vocab_size"] == sp.get_piece_size() == 512 and sp.eos_id() == EOD

    docs = {}
    for name in ("math_ref_train", "math_train", "math_heldout", "general", "policy_train"):
        tf = TokenFile(tmp_path / name)
        assert tf.eod_id == EOD and tf.vocab_size == 512 and tf.tokens[-1] == EOD
        docs[name] = _documents(np.asarray(tf.tokens), EOD)
        assert len(docs[name]) == tf.num_documents == summary["files"][name]["documents"] > 0
        assert len(tf) == summary["files"][name]["tokens"]
        raw = np.asarray(tf.tokens)
        start = 0
        for doc in docs[name][:3]:  # spot-check against sentencepiece run directly on the decoded text
            text = sp.decode(list(doc))
            assert len(text) >= 80
            assert sp.encode(text) + [EOD] == raw[start:start + len(doc) + 1].tolist()
            start += len(doc) + 1

    decoded = {name: {sp.decode(list(d)) for d in ds} for name, ds in docs.items()}
    math_files = ("math_ref_train", "math_train", "math_heldout")
    assert set().union(*(decoded[n] for n in math_files)) == set(texts["math"])  # exact text round trip
    assert sum(len(docs[n]) for n in math_files) == len(texts["math"])
    assert not decoded["math_heldout"] & (decoded["math_train"] | decoded["math_ref_train"])
    assert not decoded["math_train"] & decoded["math_ref_train"]
    assert decoded["general"] <= set(texts["general"]) and not decoded["general"] & set(texts["math"])
    assert sorted(docs["policy_train"]) == sorted(docs["math_train"] + docs["general"])
    assert docs["policy_train"] != docs["math_train"] + docs["general"]  # interleaved, not concatenated
    assert 0.45 <= summary["policy_train_math_fraction"] <= 0.65
    n_math = len(texts["math"])
    assert abs(len(docs["math_heldout"]) - 0.15 * n_math) <= 1 and abs(len(docs["math_train"]) - 0.5 * n_math) <= 1
