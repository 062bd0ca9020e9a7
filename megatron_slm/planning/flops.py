"""Model FLOPs of one training step, from the configs alone (for TFLOP/s and MFU in the training log).

The count is the dense-transformer count of Megatron-LM's ``num_floating_point_operations`` (training.py),
for a Llama/Mistral-family decoder: 2 FLOPs per multiply-add, matmuls only (norms, RoPE, softmax, the
activation function and the optimizer are not counted). Per token, one forward pass costs

* per layer, attention projections with GQA (``kv = num_query_groups * H / num_attention_heads``):
  Q and output projection ``2 * 2*H*H``, K and V ``2 * 2*H*kv``;
* per layer, attention scores ``Q K^T`` and the weighted values ``A V``: ``2 * 2*s*H`` over the full
  sequence length ``s``. Like Megatron-LM this counts the full ``s x s`` score matrix, not the causal half
  (nor a sliding window), so it is an upper bound of the attention work;
* per layer, the SwiGLU MLP: three matmuls (gate, up, down), ``3 * 2*H*F``;
* once, the output layer (logits) ``2*H*V`` with ``V`` the vocabulary padded as the model pads it
  (``make_vocab_size_divisible_by * tensor_model_parallel_size``). The embedding lookup costs nothing.

A training step counts, for ``global_batch_size * seq_length`` tokens:

* the policy's forward and backward: 3x its forward (backward = 2x forward), as ``6 * N * tokens`` does;
* SLM with an online reference: the frozen reference's forward (1x), with the reference's own shape. It is
  real work of an SLM step (the excess loss needs it), so it counts toward TFLOP/s and MFU. An offline
  reference (precomputed scores) and the CLM baseline have no reference pass;
* SLM with ``selection_scope == "global_batch"``: one more forward-only pass of the policy that scores the
  whole global batch before the training pass.

Activation recomputation is not counted (model FLOPs, not hardware FLOPs), as in Megatron-LM's MFU.

Offline scoring (``slm score-reference``) runs the reference's forward only over each scored token:
``reference_forward_flops`` (1/3 of the reference's forward + backward), for ``slm plan``'s scoring section.
"""

from __future__ import annotations

from megatron_slm.config import padded_vocab_size, reference_in_memory


def forward_flops_per_token(model, seq_length: int, tp: int = 1) -> float:
    """FLOPs of one forward pass of ``model`` (a ModelConfig with its shape set), per token of a sequence of
    ``seq_length`` tokens: layers (attention projections, scores/values over the full ``s``, SwiGLU MLP) plus
    the output layer."""
    h, f, n_layers = model.hidden_size, model.ffn_hidden_size, model.num_layers
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    kv = groups * h / heads  # width of K (and of V) with grouped-query attention
    projections = 2 * (2 * h * h) + 2 * (2 * h * kv)  # Q, output; K, V
    attention = 2 * (2 * seq_length * h)  # Q K^T and A V over the full sequence
    mlp = 3 * (2 * h * f)  # SwiGLU: gate, up, down
    logits = 2 * h * padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp)
    return float(n_layers * (projections + attention + mlp) + logits)


def training_step_flops(cfg, batch_size: int | None = None, seq_length: int | None = None) -> float:
    """Model FLOPs of one training step (all ranks together) of ``cfg`` (a resolved ``Config``, see config.resolve).

    ``batch_size`` sequences (default ``cfg.train.global_batch_size``) of ``seq_length`` tokens (default
    ``cfg.train.seq_length``): the policy's forward + backward (3x forward), plus the online reference's
    forward (SLM, online), plus a forward-only policy scoring pass (SLM, global_batch scope). See the module
    docstring for what one forward counts."""
    b = cfg.train.global_batch_size if batch_size is None else batch_size
    s = cfg.train.seq_length if seq_length is None else seq_length
    tp = cfg.parallel.tensor_model_parallel_size
    tokens = b * s
    policy_forward = forward_flops_per_token(cfg.model, s, tp) * tokens
    total = 3 * policy_forward
    if reference_in_memory(cfg):  # config.resolve gave the reference the policy's unset fields
        total += forward_flops_per_token(cfg.reference.model, s, tp) * tokens
    if cfg.slm.loss_mode == "slm" and cfg.slm.selection_scope == "global_batch":
        total += policy_forward
    return float(total)


def reference_forward_flops(cfg, tokens: int, seq_length: int | None = None) -> float:
    """Model FLOPs of ``slm score-reference`` over ``tokens`` tokens (in sequences of ``seq_length``, default
    ``cfg.train.seq_length``): one forward of the reference (``cfg.reference.model``, which config.resolve gave
    the policy's unset fields) per token, whatever the reference mode of the training run."""
    s = cfg.train.seq_length if seq_length is None else seq_length
    return forward_flops_per_token(cfg.reference.model, s, cfg.parallel.tensor_model_parallel_size) * tokens
