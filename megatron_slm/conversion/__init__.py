"""Convert between transformers Llama/Mistral directories and megatron_slm checkpoints.

    slm convert hf-to-megatron --input HF_DIR --output CKPT [--dtype bf16] [--verify]
    slm convert megatron-to-hf --input CKPT --output HF_DIR [--dtype fp32|bf16] [--tokenizer-model TOKENIZER]

transformers and safetensors are the ``hf`` extra: pip install 'megatron_slm[hf]'.

Modules, one job each:

- ``converters``: ``hf_to_megatron``, ``megatron_to_hf``, ``verify_conversion``, ``load_hf_model``;
- ``tokenizer_export``: which tokenizer an export writes, its fingerprint check, writing its files;
- ``sentencepiece_json``: a sentencepiece model as a tokenizer.json that encodes exactly as it does;
- ``safetensors_io``: weights as (sharded) safetensors files.

The command line is ``slm convert`` (megatron_slm/cli.py).

The mapping itself (configs, weight names, fused QKV/fc1 layouts, RoPE and sliding-window facts) lives in
megatron_slm/model/hf.py, shared with checkpoint.load_weights.

Every user-facing failure raises ``ConvertError`` (or the checkpoint's ``CheckpointError``); ``slm convert``
prints it as one ``error: ...`` line and returns 2. Nothing is imported here: ``slm --help`` must not import torch.
"""

DTYPE_NAMES = ("bf16", "fp32")  # the weights' dtypes (converters.DTYPES), for the command line's choices
