"""Selection heatmaps (HTML parsed back with html.parser) and run plots (real PNG files).

Truths are written into synthetic dumps by hand: which tokens are selected or masked, their losses, and
text with HTML special characters. The checkpoint mode is checked against plain
``torch.nn.functional.cross_entropy`` on the saved models' logits and a plain-Python top-k.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from megatron_slm.analysis import heatmap, plots, text_selection

# matplotlib is a test extra (pyproject); only the PNG checks need it
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _slm(command: str, argv: list[str]) -> int:
    """``slm COMMAND ARGV`` in this process; its exit status."""
    from megatron_slm import cli

    return cli.main([command, *argv])


# ------------------------------------------------------------------------------------------------
# Parsing the page back


class Spans(HTMLParser):
    """Every <span class="tok ..."> with its classes, attributes and text; ``ctx`` spans; sections."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.toks, self.ctx, self.sections, self.tags = [], [], [], []
        self._stack = []  # the open span records (None for spans we do not track)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(a)
        if tag == "span":
            cls = (a.get("class") or "").split()
            rec = None
            if "tok" in cls:
                rec = {"cls": set(cls), "title": a.get("title", ""), "style": a.get("style", ""), "text": ""}
                self.toks.append(rec)
            elif "ctx" in cls:
                rec = {"text": ""}
                self.ctx.append(rec)
            self._stack.append(rec)

    def handle_endtag(self, tag):
        if tag == "span" and self._stack:
            self._stack.pop()

    def handle_data(self, data):
        for rec in self._stack:
            if rec is not None:
                rec["text"] += data


def parse(page: str) -> Spans:
    p = Spans()
    p.feed(page)
    p.close()
    return p


def title_number(title: str, name: str) -> float:
    m = re.search(rf"{name} ([-+]?\d+\.\d+|nan)", title)
    assert m, f"no '{name}' in title {title!r}"
    return float(m.group(1))


# ------------------------------------------------------------------------------------------------
# Synthetic dumps


class FakeTokenizer:
    """id -> sentencepiece-style piece; HTML special characters on purpose."""

    PIECES = [
        "<unk>",
        "</s>",
        "\u2581hello",
        "<script>",
        "&",
        '"',
        "\u2581world",
        "<0x0A>",
        "'",
        "</script>",
        "\u2581a\u2581b",
        "x<y",
        "&amp;",
        "\u2581",
    ]

    def id_to_piece(self, i):
        return self.PIECES[i]

    def get_piece_size(self):
        return len(self.PIECES)

    def is_control(self, i):
        return i == 1


EXPECTED_TEXT = {
    0: "<unk>",
    1: "</s>",
    2: " hello",
    3: "<script>",
    4: "&",
    5: '"',
    6: " world",
    7: "\n",
    8: "'",
    9: "</script>",
    10: " a b",
    11: "x<y",
    12: "&amp;",
    13: " ",
}


def make_dump(iteration=10, k=0.5, seed=0, n_seq=2, s=16, tokens=None):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for j in range(n_seq):
        toks = tokens[j] if tokens is not None else torch.randint(2, len(FakeTokenizer.PIECES), (s + 1,), generator=g)
        toks = torch.as_tensor(toks)
        labels = toks[1:].clone()
        inputs = toks[:-1].clone()
        labels[5] = 1  # an EOD label: masked
        mask = (labels != 1).float()
        mask[-1] = 0.0  # padding-like
        pol = torch.rand(s, generator=g) * 5
        ref = torch.rand(s, generator=g) * 5
        excess = pol - ref
        keyed = torch.where(mask > 0, excess, torch.tensor(-1e9))
        order = sorted(range(s), key=lambda t: (-float(keyed[t]), t))
        n_sel = round(k * int(mask.sum()))
        selected = torch.zeros(s, dtype=torch.bool)
        selected[order[:n_sel]] = True
        seqs.append(
            {
                "tokens": inputs,
                "labels": labels,
                "loss_mask": mask,
                "policy_loss": pol,
                "ref_loss": ref,
                "selected": selected,
            }
        )
    return {"iteration": iteration, "k": k, "scope": "micro_batch", "tokenizer": None, "sequences": seqs}


def test_html_tokens_selection_titles_escaping():
    dump = make_dump()
    page = heatmap.render_html(dump, tokenizer=FakeTokenizer())
    assert page.startswith("<!DOCTYPE html>")
    # No raw markup from token text: only escaped forms; and no external assets.
    assert "<script" not in page.lower() and "</script" not in page.lower()
    assert "&lt;script&gt;" in page and "&amp;amp;" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", page) and "@import" not in page

    parsed = parse(page)
    seqs = dump["sequences"]
    assert len(parsed.toks) == sum(len(s["labels"]) for s in seqs)  # one span per scored position
    assert len(parsed.ctx) == len(seqs)
    i = 0
    for j, s in enumerate(seqs):
        ex = s["policy_loss"] - s["ref_loss"]
        assert parsed.ctx[j]["text"] == EXPECTED_TEXT[int(s["tokens"][0])]
        for t in range(len(s["labels"])):
            span = parsed.toks[i]
            i += 1
            valid, sel = bool(s["loss_mask"][t] > 0), bool(s["selected"][t])
            assert span["text"] == EXPECTED_TEXT[int(s["labels"][t])]  # unescaped back to the token's text
            assert ("sel" in span["cls"]) == sel
            assert ("masked" in span["cls"]) == (not valid)
            assert ("unsel" in span["cls"]) == (valid and not sel)
            assert ("nl" in span["cls"]) == (int(s["labels"][t]) == 7)
            assert title_number(span["title"], "policy loss") == pytest.approx(float(s["policy_loss"][t]), abs=6e-4)
            assert title_number(span["title"], "reference loss") == pytest.approx(float(s["ref_loss"][t]), abs=6e-4)
            if valid:
                assert title_number(span["title"], "excess loss") == pytest.approx(float(ex[t]), abs=1.1e-3)
                assert span["title"].endswith("not selected") != sel
                # diverging colour: red for positive excess, blue for negative
                r, g, b = (int(x, 16) for x in re.search(r"background:#(..)(..)(..)", span["style"]).groups())
                if ex[t] > 0.3:
                    assert r > b
                elif ex[t] < -0.3:
                    assert b > r
            else:
                assert "masked" in span["title"] and "background" not in span["style"]
    # header: k, scope, iteration, selected fraction over the shown sequences
    valid = sum(int(s["loss_mask"].sum()) for s in seqs)
    chosen = sum(int(s["selected"].sum()) for s in seqs)
    head = page[page.index("<header>") : page.index("</header>")]
    assert "k = 0.5" in head and "scope = micro_batch" in head and "iteration 10" in head
    assert f"{100 * chosen / valid:.1f}%" in head


def test_reference_hard_tokens_are_boxed():
    """Unselected scored tokens whose reference loss is above the line get the dashed 'rhard' box, nothing else;
    by default the line is the 75th percentile of the reference loss over the scored tokens shown."""
    dump = make_dump(seed=3)
    seqs = dump["sequences"]
    flat = [
        (float(s["ref_loss"][t]), bool(s["loss_mask"][t] > 0), bool(s["selected"][t]))
        for s in seqs
        for t in range(len(s["labels"]))
    ]
    for line in (2.5, None):
        page = heatmap.render_html(dump, tokenizer=FakeTokenizer(), ref_hard_loss=line)
        if line is None:
            refs = sorted(r for r, ok, _ in flat if ok)
            line = refs[int(0.75 * len(refs))]
        boxed = [("rhard" in span["cls"]) for span in parse(page).toks]
        want = [ok and not sel and r > line for r, ok, sel in flat]
        assert boxed == want and any(want)
        assert f"reference loss &gt; {line:.2f}</span> ({sum(want)} tokens" in page


def test_colour_scale_is_centred():
    assert heatmap.excess_color(0.0, 2.0) == heatmap.MID_RGB
    assert heatmap.excess_color(5.0, 2.0) == heatmap.POS_RGB  # clipped
    assert heatmap.excess_color(-2.0, 2.0) == heatmap.NEG_RGB
    r, g, b = heatmap.excess_color(1.0, 2.0)
    assert r > g and r > b


def test_sentencepiece_pieces_round_trip(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = 'The integral of x dx is x**2/2 + C.\n<script>alert("x") & y</script>\nSpaces   and\ttabs; caf\u00e9 \u2192 \u222b.\n'
    corpus = (text * 3 + " ".join(f"word{i} token{i % 7} value{i % 13}" for i in range(300))).split("\n")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=330,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        eos_id=2,
        minloglevel=2,
    )
    path = tmp_path / "tok.model"
    path.write_bytes(model.getvalue())
    from megatron_slm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    ids = tok.encode(text)
    assert any(tok._sp.id_to_piece(i).startswith("<0x") for i in ids)  # byte fallback exercised (\u2192, \u222b)
    assert "".join(heatmap.token_texts(tok, ids)) == text
    s = len(ids) - 1
    dump = {
        "iteration": 3,
        "k": 0.6,
        "scope": "sequence",
        "tokenizer": str(path),
        "sequences": [
            {
                "tokens": torch.tensor(ids[:-1]),
                "labels": torch.tensor(ids[1:]),
                "loss_mask": torch.ones(s),
                "policy_loss": torch.linspace(0, 4, s),
                "ref_loss": torch.full((s,), 2.0),
                "selected": torch.arange(s) % 2 == 0,
            }
        ],
    }
    page = heatmap.render_html(dump)  # the tokenizer from the dump's path
    parsed = parse(page)
    assert len(parsed.toks) == s
    assert parsed.ctx[0]["text"] + "".join(t["text"] for t in parsed.toks) == text  # spaces, tabs, newlines kept
    assert sum("sel" in t["cls"] for t in parsed.toks) == (s + 1) // 2
    assert sum("nl" in t["cls"] for t in parsed.toks) == text.count("\n") - (ids[0] == tok._sp.piece_to_id("<0x0A>"))
    assert "<script" not in page.lower()
    assert ".tokens{" in page and "white-space:pre-wrap" in page


@needs_matplotlib
def test_dump_directory_sections_caps_and_cli(tmp_path):
    fixed = [torch.arange(17) % 12 + 2, (torch.arange(17) * 5) % 12 + 2]
    run = tmp_path / "run"
    (run / "selection_dumps").mkdir(parents=True)
    for it, seed in ((20, 1), (10, 2), (30, 3)):
        d = make_dump(iteration=it, seed=seed, tokens=fixed if it != 30 else None)
        torch.save(d, run / "selection_dumps" / f"iter_{it:07d}.pt")
    dumps = heatmap.load_dumps(run)
    assert [d["iteration"] for d in dumps] == [10, 20, 30]
    page = heatmap.render_html(dumps, tokenizer=FakeTokenizer(), max_tokens=5, max_sequences=1)
    parsed = parse(page)
    assert [s.get("data-iteration") for s in parsed.sections if "dump" in s.get("class", "")] == ["10", "20", "30"]
    tracked = [s for s in parsed.sections if "tracked" in s.get("class", "")]
    assert len(tracked) == 1  # sequence 0 of iterations 10 and 20 is the same
    assert len(parsed.toks) == 2 * 5 + 3 * 5  # tracked copies + one capped sequence per dump
    assert "11 more tokens not shown" in page and "sequences not shown" in page
    page2 = heatmap.render_html(dumps, tokenizer=FakeTokenizer(), max_dumps=2)
    assert [s.get("data-iteration") for s in parse(page2).sections if "dump" in s.get("class", "")] == ["10", "30"]
    # the same sequences in every dump (checkpoints scored on one text): shown side by side only
    parsed3 = parse(heatmap.render_html(dumps[:2], tokenizer=FakeTokenizer()))
    assert [s.get("class") for s in parsed3.sections] == ["tracked"] and len(parsed3.toks) == 2 * 2 * 16

    out = tmp_path / "page.html"
    png = tmp_path / "page.png"
    # the dumps name no tokenizer: token ids are shown
    assert _slm("viz", ["--dump", str(run), "--out", str(out), "--png", str(png), "--png-tokens", "40"]) == 0
    parsed = parse(out.read_text())
    assert len(parsed.toks) > 0 and all(re.fullmatch(r"\[\d+\]", t["text"]) for t in parsed.toks)
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 5000
    assert _slm("viz", ["--dump", str(tmp_path / "nowhere"), "--out", str(out)]) == 2


# ------------------------------------------------------------------------------------------------
# Plots


def _write_run(path: Path, mode: str, k: float, eval_losses, iters=40, seed=0, dumps=False):
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    lines = []
    for it in range(1, iters + 1):
        base = 6.0 - 2.0 * it / iters + 0.1 * float(torch.rand(1, generator=g))
        row = {
            "iteration": it,
            "split": "train",
            "loss_selected": base + (0.4 if mode == "slm" else 0.0),
            "loss_all": base,
            "grad_norm": 1.0,
            "lr": 1e-3,
            "step_time": 0.5,
            "tokens_per_s": 4000.0,
        }
        if mode == "slm":
            row.update(
                ref_loss=4.0,
                excess_selected=1.5 - it / iters,
                excess_unselected=-0.5,
                selected_fraction=k + 0.01 * float(torch.rand(1, generator=g)),
            )
        lines.append(json.dumps(row))
        if it % 10 == 0:
            lines.append(json.dumps({"iteration": it, "split": "eval", "loss": eval_losses[it // 10 - 1]}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"iteration": 41, "spl')  # a cut-off last line
    summary = {
        "loss_mode": mode,
        "k": k,
        "iterations": iters,
        "eval_loss": eval_losses[-1],
        "final": {},
        "mean_second_half": {"selected_fraction": k, "excess_selected": 1.0, "excess_unselected": -0.5},
        "selected_fraction_by_dataset": [0.7, 0.4] if mode == "slm" else None,
    }
    (path / "summary.json").write_text(json.dumps(summary))
    if dumps:
        (path / "selection_dumps").mkdir()
        for it in (10, 20, 30, 40):
            torch.save(make_dump(iteration=it, k=k, seed=it, s=64), path / "selection_dumps" / f"iter_{it:07d}.pt")


def _assert_png(path: Path, min_kb: float = 10):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > min_kb * 1024, (path, len(data))


@needs_matplotlib
def test_plots_from_runs(tmp_path):
    _write_run(tmp_path / "slm", "slm", 0.6, [5.0, 4.6, 4.3, 4.1], seed=1, dumps=True)
    _write_run(tmp_path / "slm_k04", "slm", 0.4, [5.1, 4.7, 4.4, 4.25], seed=2)
    _write_run(tmp_path / "slm_k08", "slm", 0.8, [5.0, 4.7, 4.4, 4.2], seed=3)
    _write_run(tmp_path / "clm", "clm", 1.0, [5.0, 4.7, 4.45, 4.3], seed=4)
    run = plots.load_run(tmp_path / "slm")
    assert run.loss_mode == "slm" and run.k == 0.6 and len(run.train) == 40 and len(run.eval) == 4

    out = tmp_path / "plots"
    args = [
        f"SLM k=0.6={tmp_path / 'slm'}",
        str(tmp_path / "slm_k04"),
        str(tmp_path / "slm_k08"),
        f"CLM={tmp_path / 'clm'}",
        "--out",
        str(out),
        "--k-sweep",
    ]
    assert _slm("plot", args) == 0
    for name in ("slm_vs_clm", "selection_stats", "k_sweep", "excess_hist"):
        _assert_png(out / f"{name}.png")

    with open(out / "k_sweep.csv") as f:
        rows = list(__import__("csv").DictReader(f))
    assert [(r["loss_mode"], r["k"], r["eval_loss"]) for r in rows] == [
        ("slm", "0.4000", "4.2500"),
        ("slm", "0.6000", "4.1000"),
        ("slm", "0.8000", "4.2000"),
        ("clm", "1.0000", "4.3000"),
    ]
    md = (out / "k_sweep.md").read_text()
    assert "SLM k=0.6 **best**" in md and "-0.2000" in md  # 4.10 - 4.30

    assert _slm("plot", [str(tmp_path / "nope"), "--out", str(out)]) == 2
    with pytest.raises(ValueError, match="no SLM run"):
        plots.plot_selection_stats([tmp_path / "clm"], out / "x.png")


# ------------------------------------------------------------------------------------------------
# Checkpoint mode: losses and selection computed from saved models


def _checkpoint_mode(tmp):
    import torch.nn.functional as F

    from megatron_slm.checkpoint import save_model_weights
    from megatron_slm.config import ModelConfig, ParallelConfig
    from megatron_slm.data.tokenizer import load_tokenizer
    from megatron_slm.model.build import build_model
    from megatron_slm.parallel import distributed

    tok = load_tokenizer(Path(tmp) / "tok.model")
    texts = ['f(x) = <b>x</b> & "y"\n  g(x) = x', "word1 token2 value3 word4"]
    distributed.initialize(1, 1)
    truth = {}
    for name, seed in (("policy", 1), ("reference", 2)):
        m = ModelConfig(
            num_layers=2,
            hidden_size=32,
            ffn_hidden_size=64,
            num_attention_heads=4,
            num_query_groups=2,
            vocab_size=tok.vocab_size,
            max_position_embeddings=64,
            rotary_base=10000.0,
            norm_epsilon=1e-5,
            untie_embeddings_and_output_weights=False,
        )
        model = build_model(m, ParallelConfig(), seed=seed)
        save_model_weights(model, str(Path(tmp) / name), m)
        model.eval()
        losses = []
        with torch.no_grad():
            for text in texts:
                ids = [tok.eod] + tok.encode(text) + [tok.eod]
                t = torch.tensor([ids[:-1]])
                logits = model(t, torch.arange(t.shape[1])[None], attention_mask=None)[0, :, : tok.vocab_size]
                losses.append(F.cross_entropy(logits.float(), torch.tensor(ids[1:]), reduction="none"))
        truth[name] = losses
    dumps = text_selection.compute_selection(
        str(Path(tmp) / "policy"), str(Path(tmp) / "reference"), texts, str(Path(tmp) / "tok.model"), k=0.5
    )
    batch = text_selection.compute_selection(
        str(Path(tmp) / "policy"),
        str(Path(tmp) / "reference"),
        texts,
        str(Path(tmp) / "tok.model"),
        k=0.3,
        scope="batch",
        seq_length=8,
    )
    return dumps, batch, truth, texts


def test_checkpoint_mode_matches_plain_cross_entropy(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from dist_helpers import run_distributed

    corpus = ['f(x) = <b>x</b> & "y"', "  g(x) = x"] + [f"word{i} token{i % 7} value{i % 13}" for i in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (tmp_path / "tok.model").write_bytes(model.getvalue())
    dumps, batch, truth, texts = run_distributed(_checkpoint_mode, 1, str(tmp_path))[0]
    (d,) = dumps
    assert d["k"] == 0.5 and d["label"].endswith("policy") and len(d["sequences"]) == len(texts)
    for seq, pol, ref in zip(d["sequences"], truth["policy"], truth["reference"]):
        torch.testing.assert_close(seq["policy_loss"], pol, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(seq["ref_loss"], ref, atol=1e-4, rtol=1e-4)
        valid = seq["loss_mask"] > 0
        assert not valid[-1] and valid[:-1].all()  # the closing EOD label is masked
        ex = (pol - ref).tolist()
        n = int(valid.sum())
        top = sorted((t for t in range(n)), key=lambda t: (-ex[t], t))[: math.floor(0.5 * n + 0.5)]
        assert sorted(torch.nonzero(seq["selected"]).flatten().tolist()) == sorted(top)
    # scope="batch", windows of 8 tokens: top-k over every window of every text together
    (b,) = batch
    assert all(len(s["labels"]) <= 8 for s in b["sequences"]) and len(b["sequences"]) > len(texts)
    ex = torch.cat([s["policy_loss"] - s["ref_loss"] for s in b["sequences"]]).tolist()
    valid = torch.cat([s["loss_mask"] for s in b["sequences"]]).bool().tolist()
    pool = [t for t in range(len(ex)) if valid[t]]
    top = sorted(pool, key=lambda t: (-ex[t], t))[: math.floor(0.3 * len(pool) + 0.5)]
    assert torch.nonzero(torch.cat([s["selected"] for s in b["sequences"]])).flatten().tolist() == sorted(top)
    assert torch.equal(
        torch.cat([s["labels"] for s in b["sequences"]]), torch.cat([s["labels"] for s in d["sequences"]])
    )

    page = heatmap.render_html(dumps)
    parsed = parse(page)
    assert len(parsed.toks) == sum(len(s["labels"]) for s in d["sequences"])
    assert "<b>x" not in page  # escaped in the page, the text itself once parsed:
    assert texts[0] in parsed.ctx[0]["text"] + "".join(
        t["text"] for t in parsed.toks[: len(d["sequences"][0]["labels"])]
    )
