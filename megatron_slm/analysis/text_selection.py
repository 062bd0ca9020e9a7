"""Per-token selection of texts computed from checkpoints: the heatmap's checkpoint mode.

A reference and one or several policy checkpoints score some texts (forward passes in this process at TP=1 PP=1);
the top-k tokens by excess loss are selected as SLM would. The result is a list of dumps in the trainer's format
(``--selection-dump-interval``), drawn by megatron_slm/analysis/heatmap.py like the trainer's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def _load(directory, vocab_size: int):
    """The checkpoint's model (TP=1 PP=1, eval mode) and its config; its vocabulary must be the tokenizer's."""
    from megatron_slm.checkpoint import read_model_config
    from megatron_slm.model.loading import load_model

    cfg = read_model_config(directory)
    return load_model(directory, cfg, expected_vocab=vocab_size), cfg


@torch.no_grad()
def _token_losses(model, cfg, windows: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    from megatron_slm.data.batches import to_device
    from megatron_slm.training.passes import token_losses

    out = []
    for tokens, labels in windows:
        t = torch.tensor([tokens], dtype=torch.long)
        mb = {"tokens": t, "position_ids": torch.arange(t.shape[1]).unsqueeze(0), "labels": torch.tensor([labels])}
        out.append(token_losses(model, to_device([mb])[0], cfg.vocab_size)[0].cpu())
    return out


def compute_selection(
    policy,
    reference,
    texts: Sequence[str],
    tokenizer,
    k: float = 0.6,
    seq_length: int | None = None,
    scope: str = "document",
) -> list[dict]:
    """Score ``texts`` with a reference and one or several policy checkpoints; one dump per policy.

    Runs in this process at TP=1, PP=1 (initialising torch.distributed for a single process if needed).
    Each text is one document: ``[EOD] + ids`` is cut into windows of ``seq_length`` tokens (default: the
    smaller ``max_position_embeddings`` of the two models) and every window is scored on its own, as in
    training (positions whose label is EOD are masked). The top-``k`` tokens by excess loss are selected
    with :func:`megatron_slm.slm.top_k_mask` over each document (``scope="document"``: the ``sequence``
    scope applied to the whole document) or over all texts together (``scope="batch"``: as if they formed
    one batch, so documents compete: a domain the reference knows well draws more of the selection).
    Returns dumps in the trainer's format, plus ``label`` (the policy checkpoint). Every checkpoint must record
    ``tokenizer``'s fingerprint (sha256 of its file) when it records any; its vocabulary must be the tokenizer's.
    """
    import torch.distributed as dist

    from megatron_slm.analysis.evaluate import resolve_checkpoint
    from megatron_slm.checkpoint.weights import check_tokenizer
    from megatron_slm.data.tokenizer import load_tokenizer
    from megatron_slm.parallel import distributed
    from megatron_slm.slm import top_k_mask

    if not 0 < k <= 1:
        raise ValueError(f"k={k} must be in (0, 1]")
    if scope not in ("document", "batch"):
        raise ValueError(f"scope {scope!r}: use 'document' or 'batch'")
    policies = [policy] if isinstance(policy, (str, Path)) else list(policy)
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    # before any model is built: losses of the text's ids under another tokenizer's embeddings mean nothing
    for who, source in [("reference", reference)] + [("policy", p) for p in policies]:
        check_tokenizer(
            str(source),
            f"the {who} checkpoint '{source}'",
            getattr(tok, "fingerprint", None),
            tokenizer_of=f"the tokenizer '{getattr(tok, 'path', tokenizer)}'",
            fix="Pass the tokenizer file (--tokenizer) the checkpoint's training data was preprocessed with",
        )
    started = not dist.is_initialized()
    distributed.initialize(1, 1)
    try:
        ref_model, ref_cfg = _load(reference, tok.vocab_size)
        length = seq_length or ref_cfg.max_position_embeddings or 2048
        docs = []  # per document: list of (tokens, labels) windows
        for text in texts:
            ids = [tok.eod] + list(tok.encode(text)) + [tok.eod]
            starts = range(0, len(ids) - 1, length)
            windows = [
                (ids[i : min(i + length, len(ids) - 1)], ids[i + 1 : min(i + length, len(ids) - 1) + 1]) for i in starts
            ]
            docs.append(windows)
        ref_losses = [_token_losses(ref_model, ref_cfg, w) for w in docs]
        del ref_model
        dumps = []
        for p in policies:
            model, cfg = _load(p, tok.vocab_size)
            if cfg.max_position_embeddings and length > cfg.max_position_embeddings:
                raise ValueError(
                    f"seq_length {length} exceeds the policy's max_position_embeddings "
                    f"{cfg.max_position_embeddings}; pass a smaller --seq-length"
                )
            groups = []  # the token groups top-k runs over: each document, or all of them
            for windows, refs in zip(docs, ref_losses):
                pols = _token_losses(model, cfg, windows)
                masks = [torch.tensor([float(x != tok.eod) for x in lab]) for _, lab in windows]
                groups.append([(w, pl, rl, m) for w, pl, rl, m in zip(windows, pols, refs, masks)])
            if scope == "batch":
                groups = [[item for g in groups for item in g]]
            sequences = []
            for group in groups:
                excess = torch.cat([pl - rl for _, pl, rl, _ in group])
                valid = torch.cat([m for *_, m in group]) > 0
                selected = top_k_mask(excess, valid, k).split([len(m) for *_, m in group])
                for ((tokens, labels), pl, rl, m), sel in zip(group, selected):
                    sequences.append(
                        {
                            "tokens": torch.tensor(tokens),
                            "labels": torch.tensor(labels),
                            "loss_mask": m,
                            "policy_loss": pl.float(),
                            "ref_loss": rl.float(),
                            "selected": sel.bool(),
                        }
                    )
            dumps.append(
                {
                    "iteration": resolve_checkpoint(p)[1],
                    "k": k,
                    "scope": scope,
                    "tokenizer": getattr(tok, "path", None),
                    "sequences": sequences,
                    "label": "/".join(Path(p).parts[-2:]),
                }
            )
            del model
        return dumps
    finally:
        if started:
            distributed.destroy()
