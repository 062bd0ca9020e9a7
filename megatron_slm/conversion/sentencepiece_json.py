"""A sentencepiece model as a Hugging Face ``tokenizers.Tokenizer`` (tokenizer.json) that encodes exactly as the
model does, so that an exported checkpoint's tokenizer loads with ``AutoTokenizer`` and matches the training data
(megatron_slm/data/tokenizer.py encodes with sentencepiece, without BOS/EOS)."""

from __future__ import annotations

from megatron_slm.errors import ConvertError

# sentencepiece's ModelProto.SentencePiece.Type
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED = 1, 2, 3, 4
_SP_UNIGRAM, _SP_BPE = 1, 2


def sentencepiece_to_tokenizers(data: bytes, name: str = "sentencepiece model"):
    """A Hugging Face ``tokenizers.Tokenizer`` that encodes exactly as the sentencepiece model ``data`` does
    (``SentencePieceProcessor.encode``, no BOS/EOS); returns it and its unknown token.

    Mirrors sentencepiece's pipeline: the normalization rule (its precompiled charsmap), removal of extra
    whitespace, the dummy "▁" prefix, spaces as "▁", user-defined symbols as atomic pieces, then BPE (merge
    order = piece score) or unigram, with byte fallback and unknown-piece fusing as configured.

    Built here because transformers 5.24 has no converter that reproduces such a model: LlamaTokenizer drops the
    normalizer and dummy-prefix settings, and the generic SpmConverter fails on BPE models and has no byte
    fallback (it warns so)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError
        raise ConvertError(f"{name} is not a readable sentencepiece model") from None
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    unsupported = []
    if trainer.model_type not in (_SP_UNIGRAM, _SP_BPE):
        unsupported.append(f"model type {trainer.model_type} (only BPE and unigram)")
    if trainer.treat_whitespace_as_suffix:
        unsupported.append("treat_whitespace_as_suffix")
    if not norm.escape_whitespaces:
        unsupported.append("escape_whitespaces=false")
    if unsupported:
        raise ConvertError(
            f"sentencepiece model {name} uses {', '.join(unsupported)}, which the export does not "
            "reproduce; pass an equivalent tokenizer.json with --tokenizer-model"
        )
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    unk = next((p.piece for p in pieces if p.type == _SP_UNKNOWN), None)
    user = [p.piece for p in pieces if p.type == _SP_USER_DEFINED]
    if trainer.model_type == _SP_BPE:
        # sentencepiece merges the adjacent pair whose joined piece scores highest: every split of a normal
        # piece into two normal pieces is a merge, ranked by the joined piece's score.
        normal = {p.piece for p in pieces if p.type == _SP_NORMAL}
        ranked = []
        for p in pieces:
            if p.type != _SP_NORMAL:
                continue
            s = p.piece
            for i in range(1, len(s)):
                if s[:i] in normal and s[i:] in normal:
                    ranked.append((-p.score, vocab[s], vocab[s[:i]], s[:i], s[i:]))
        ranked.sort()
        model = BPE(
            vocab=vocab,
            merges=[(a, b) for *_, a, b in ranked],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
            # a multi-character user symbol is one pre-token that no merge builds: take it whole
            ignore_merges=any(len(u) > 1 for u in user),
        )
    else:
        model = Unigram([(p.piece, p.score) for p in pieces], vocab.get(unk), trainer.byte_fallback)
    tok = Tokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        charsmap = normalizers.Precompiled(norm.precompiled_charsmap)
        # sentencepiece matches user symbols before normalizing; one the charsmap would change (e.g. "\n" under
        # nmt_nfkc) crosses it as a private-use placeholder (plane 16, absent from real text).
        changed = [u for u in sorted(user, key=len, reverse=True) if charsmap.normalize_str(u) != u]
        hidden = {u: chr(0x10FFFD - i) for i, u in enumerate(changed)}
        steps += [normalizers.Replace(u, h) for u, h in hidden.items()] + [charsmap]
        steps += [normalizers.Replace(h, u) for u, h in hidden.items()]
    if norm.remove_extra_whitespaces:  # only " " (after the charsmap), as sentencepiece does
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:  # once per text (a pre-tokenizer's "first" skips texts starting with a space)
        steps.append(normalizers.Prepend("▁"))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    splits = []
    if user:  # matched longest first, as sentencepiece's prefix matcher does, and never merged with neighbours
        alternatives = sorted(user, key=len, reverse=True)
        pattern = "|".join("".join(f"\\x{{{ord(c):x}}}" for c in u) for u in alternatives)
        splits.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    splits.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    # Control pieces (<s>, </s>) and the unknown piece are special tokens, as in transformers' own tokenizers.
    tok.add_special_tokens(
        [AddedToken(p.piece, special=True, normalized=False) for p in pieces if p.type in (_SP_CONTROL, _SP_UNKNOWN)]
    )
    return tok, unk
