"""Per-token selection heatmaps: each scored token coloured by its excess loss, the selected ones marked.

Input is a list of *dumps* in the format the trainer writes with ``--selection-dump-interval``
(``<save>/selection_dumps/iter_NNNNNNN.pt``, see ``Trainer._dump_selection``)::

    {"iteration": int, "k": float, "scope": str, "tokenizer": path or None,
     "sequences": [{"tokens", "labels", "loss_mask", "policy_loss", "ref_loss", "selected"}, ...]}

Position ``t`` of a sequence scores ``labels[t]`` (the next token after ``tokens[t]``), so the page shows the
*label* tokens, each carrying the losses of its own position; ``tokens[0]`` is shown as context only.
:func:`megatron_slm.analysis.text_selection.compute_selection` builds the same structure from a policy and a
reference checkpoint and some text (forward passes on one CPU process), so both sources share one renderer.

- :func:`render_html` -- a self-contained page (inline CSS, one line of inline JS): colour = excess loss on a
  diverging scale centred at 0 (blue: the policy already beats the reference, white: equal, red: the policy
  is behind), selected tokens bold and underlined, masked tokens (EOD, padding) faded and struck through,
  unselected tokens the reference is bad at (its loss above ``ref_hard_loss``, by default the 75th percentile of
  its loss on the tokens shown) in a dashed box: what SLM leaves out, and may make the policy forget,
  losses in each token's ``title`` (hover). Several dumps give one section per iteration, plus the
  sequences that occur in more than one dump side by side.
- :func:`render_png` -- the same picture for one dump, drawn with matplotlib (for docs and slides; the ``viz``
  extra: pip install 'megatron_slm[viz]').
- :func:`selection_dumps` and :func:`write_heatmap` -- ``slm viz``: the dumps of either source, the page, the PNG.
"""

from __future__ import annotations

import codecs
import dataclasses
import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from megatron_slm.errors import ConfigError, require

SP_SPACE = "\u2581"  # sentencepiece's visible space
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

# Diverging scale: negative excess -> blue, 0 -> near white, positive -> red (ColorBrewer RdBu endpoints).
NEG_RGB = (33, 102, 172)
MID_RGB = (247, 247, 247)
POS_RGB = (178, 24, 43)


# ----------------------------------------------------------------------------------------------
# Token text


def _sentencepiece_of(tokenizer):
    """The sentencepiece processor behind ``tokenizer`` (our Tokenizer, a raw processor, or a look-alike)."""
    sp = getattr(tokenizer, "_sp", None)
    if sp is not None:
        return sp
    if hasattr(tokenizer, "id_to_piece"):
        return tokenizer
    return None


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token id contributes, so that ``"".join(token_texts(tok, ids))`` reads as the text.

    SentencePiece (or anything with ``id_to_piece``): the piece with ``▁`` turned back into a space;
    byte-fallback pieces (``<0x0A>``) are decoded as UTF-8 across consecutive byte pieces, each character
    attributed to the byte that completes it (earlier bytes of a multi-byte character get ``""``); control
    pieces (``</s>``) are kept as written. Other tokenizers: ``decode([id])`` per token. ``None``: ``[id]``.
    """
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [f"[{i}]" for i in ids]
    sp = _sentencepiece_of(tokenizer)
    if sp is None:
        return [tokenizer.decode([i]) for i in ids]
    is_control = getattr(sp, "is_control", None) or getattr(sp, "IsControl", None)
    size = sp.get_piece_size() if hasattr(sp, "get_piece_size") else None
    out: list[str] = []
    decoder = None  # an open UTF-8 decoder while inside a run of byte pieces
    for i in ids:
        if size is not None and not 0 <= i < size:
            piece, byte = f"[{i}]", None
        else:
            piece = sp.id_to_piece(i)
            m = _BYTE_PIECE.match(piece)
            byte = int(m.group(1), 16) if m else None
        if byte is None and decoder is not None:  # a run of byte pieces ended: flush an incomplete character
            tail = decoder.decode(b"", final=True)
            if tail:
                out[-1] += tail
            decoder = None
        if byte is not None:
            decoder = decoder or codecs.getincrementaldecoder("utf-8")(errors="replace")
            out.append(decoder.decode(bytes([byte])))
        elif is_control is not None and 0 <= i < (size or i + 1) and is_control(i):
            out.append(piece)
        else:
            out.append(piece.replace(SP_SPACE, " "))
    if decoder is not None:
        tail = decoder.decode(b"", final=True)
        if tail:
            out[-1] += tail
    return out


# ----------------------------------------------------------------------------------------------
# Loading dumps


def _dump_files(path) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        d = p / "selection_dumps" if (p / "selection_dumps").is_dir() else p
        files = sorted(d.glob("iter_*.pt"))
        if files:
            return files
        raise FileNotFoundError(
            f"no selection dumps (iter_*.pt) in {d}; train with --selection-dump-interval N --save DIR"
        )
    raise FileNotFoundError(f"selection dump {p} does not exist")


def load_dumps(paths) -> list[dict]:
    """Selection dumps from files, a ``selection_dumps/`` directory or a run directory; sorted by iteration."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    dumps = []
    for path in paths:
        for f in _dump_files(path):
            try:  # weights_only: a dump from elsewhere cannot run code
                d = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - refused or damaged: one line, as ValueError
                from megatron_slm.checkpoint.agreement import describe_failure
                from megatron_slm.checkpoint.sharded import refusal

                why = refusal(exc)
                if why:
                    raise ValueError(
                        f"refused to load {f}: it {why}, and loading it could run code (dumps may come "
                        "from anyone, so only plain data is loaded); use a dump you trust"
                    ) from None
                raise ValueError(f"{f} cannot be read as a selection dump ({describe_failure(exc)})") from None
            if not isinstance(d, dict) or "sequences" not in d:
                raise ValueError(f"{f} is not a selection dump (a dict with 'sequences')")
            d.setdefault("source", str(f))
            dumps.append(d)
    dumps.sort(key=lambda d: d.get("iteration") or 0)
    return dumps


def _load_tokenizer_for(dumps: list[dict], tokenizer):
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    path = tokenizer or next((d.get("tokenizer") for d in dumps if d.get("tokenizer")), None)
    if not path:
        return None
    from megatron_slm.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except Exception as exc:  # a dump from another machine: show ids rather than fail
        if tokenizer:  # asked for explicitly: an error
            raise
        import warnings

        warnings.warn(f"cannot load the dump's tokenizer {path} ({exc}); showing token ids", stacklevel=2)
        return None


# ----------------------------------------------------------------------------------------------
# One sequence, ready to draw


@dataclasses.dataclass
class SeqView:
    context: str  # text of tokens[0] (input only)
    texts: list[str]  # text of each label token
    ids: list[int]
    valid: list[bool]
    selected: list[bool]
    policy: list[float]
    ref: list[float]
    shown: int  # tokens drawn (<= len(texts))

    @property
    def excess(self) -> list[float]:
        return [p - r for p, r in zip(self.policy, self.ref)]

    def stats(self) -> dict:
        n_valid = sum(self.valid)
        sel = [e for e, s in zip(self.excess, self.selected) if s]
        uns = [e for e, s, v in zip(self.excess, self.selected, self.valid) if v and not s]
        return {
            "tokens": len(self.texts),
            "valid": n_valid,
            "selected": len(sel),
            "fraction": len(sel) / n_valid if n_valid else float("nan"),
            "excess_selected": _mean(sel),
            "excess_unselected": _mean(uns),
        }


def _mean(xs) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _floats(t) -> list[float]:
    return [float(x) for x in torch.as_tensor(t).float().reshape(-1).tolist()]


def seq_view(seq: dict, tokenizer, max_tokens: int | None = None) -> SeqView:
    labels = [int(x) for x in torch.as_tensor(seq["labels"]).reshape(-1).tolist()]
    tokens = [int(x) for x in torch.as_tensor(seq["tokens"]).reshape(-1).tolist()]
    valid = [bool(x > 0) for x in _floats(seq["loss_mask"])]
    selected = [bool(x) for x in torch.as_tensor(seq["selected"]).reshape(-1).tolist()]
    texts = token_texts(tokenizer, tokens[:1] + labels)
    n = len(labels)
    return SeqView(
        context=texts[0] if tokens else "",
        texts=texts[1:],
        ids=labels,
        valid=valid,
        selected=selected,
        policy=_floats(seq["policy_loss"]),
        ref=_floats(seq["ref_loss"]),
        shown=n if not max_tokens else min(n, max_tokens),
    )


def dump_stats(views: Iterable[SeqView]) -> dict:
    n_valid = n_sel = 0
    sel, uns, pol, ref = [], [], [], []
    for v in views:
        for e, p, r, s, ok in zip(v.excess, v.policy, v.ref, v.selected, v.valid):
            if not ok:
                continue
            n_valid += 1
            n_sel += s
            (sel if s else uns).append(e)
            pol.append(p)
            ref.append(r)
    return {
        "valid": n_valid,
        "selected": n_sel,
        "fraction": n_sel / n_valid if n_valid else float("nan"),
        "excess_selected": _mean(sel),
        "excess_unselected": _mean(uns),
        "policy_loss": _mean(pol),
        "ref_loss": _mean(ref),
    }


# ----------------------------------------------------------------------------------------------
# Colour


def excess_color(e: float, vmax: float) -> tuple[int, int, int]:
    """RGB of excess loss ``e`` on the diverging scale [-vmax, +vmax] (clipped), white at 0."""
    if not math.isfinite(e):
        return (200, 200, 200)
    t = max(-1.0, min(1.0, e / vmax)) if vmax > 0 else 0.0
    end = POS_RGB if t > 0 else NEG_RGB
    a = abs(t)
    return tuple(round(m + (x - m) * a) for m, x in zip(MID_RGB, end))


def _hex(rgb) -> str:
    r, g, b = rgb
    return f"#{r:02x}{g:02x}{b:02x}"


def color_scale(views: Iterable[SeqView], quantile: float = 0.98) -> float:
    """Symmetric colour range: the ``quantile`` of |excess| over valid tokens (robust to a few outliers)."""
    xs = sorted(abs(e) for v in views for e, ok in zip(v.excess, v.valid) if ok and math.isfinite(e))
    if not xs:
        return 1.0
    return max(xs[min(len(xs) - 1, int(quantile * len(xs)))], 1e-6)


# ----------------------------------------------------------------------------------------------
# HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em auto;max-width:72em;padding:0 1em;color:#222}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin:1.6em 0 .3em;border-bottom:1px solid #ccc}
h3{font-size:.95em;margin:1em 0 .3em;font-weight:600;color:#444}
.meta,.note{color:#555;font-size:.9em}.note{font-style:italic}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 8px;text-align:right}
.legend{display:flex;flex-wrap:wrap;gap:1.5em;align-items:center;font-size:.85em;margin:.8em 0}
.bar{display:inline-block;width:14em;height:1em;vertical-align:middle;border:1px solid #999;
 background:linear-gradient(to right,%NEG%,%MID%,%POS%)}
.tokens{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;line-height:1.95;
 white-space:pre-wrap;overflow-wrap:anywhere;border:1px solid #ddd;padding:.5em .7em;background:#fff}
.tok{border-radius:2px}.tok:hover{outline:1px solid #000}
.sel{font-weight:700;box-shadow:inset 0 -3px 0 #111}
.rhard{outline:1px dashed #333;outline-offset:-1px}
.masked{color:#888;background:#eee!important;text-decoration:line-through;opacity:.6}
.tok.nl::before{content:"\\21b5";color:#888}
.tok:empty::before{content:"\\b7";color:#888}
.ctx{color:#888;font-style:italic}
body.fade .tok.unsel{opacity:.35}
"""


def _token_title(text: str, tid: int, p: float, r: float, selected: bool, valid: bool) -> str:
    head = f"{text!r} (id {tid})"
    if not valid:
        return f"{head}\nmasked: not scored, never selected\npolicy loss {p:.3f}\nreference loss {r:.3f}"
    return (
        f"{head}\npolicy loss {p:.3f}\nreference loss {r:.3f}\nexcess loss {p - r:+.3f}\n"
        f"{'selected' if selected else 'not selected'}"
    )


def _span(
    text: str, tid: int, p: float, r: float, selected: bool, valid: bool, vmax: float, ref_hard: float = math.inf
) -> str:
    if not valid:
        cls = "tok masked"
        style = ""
    else:
        cls = "tok sel" if selected else ("tok unsel rhard" if r > ref_hard else "tok unsel")
        rgb = excess_color(p - r, vmax)
        style = f' style="background:{_hex(rgb)}' + (';color:#fff"' if _dark(rgb) else '"')
    if "\n" in text:
        cls += " nl"
    title = html.escape(_token_title(text, tid, p, r, selected, valid), quote=True)
    return f'<span class="{cls}"{style} title="{title}">{html.escape(text, quote=False)}</span>'


def _ref_quantile(views, q: float) -> float:
    """The ``q`` quantile of the reference loss over the scored tokens shown (inf when there are none)."""
    refs = sorted(r for vs in views for v in vs for r, ok in zip(v.ref[: v.shown], v.valid[: v.shown]) if ok)
    return refs[min(int(q * len(refs)), len(refs) - 1)] if refs else math.inf


def _dark(rgb) -> bool:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b < 110


def _sequence_html(v: SeqView, vmax: float, heading: str, ref_hard: float = math.inf) -> str:
    st = v.stats()
    parts = [
        f'<div class="seq"><h3>{html.escape(heading)} <span class="meta">{st["tokens"]} tokens, '
        f"{st['valid']} scored, {st['selected']} selected ({_pct(st['fraction'])}); mean excess "
        f"selected {_num(st['excess_selected'])} / unselected {_num(st['excess_unselected'])}</span></h3>",
        '<div class="tokens">',
    ]
    if v.context:
        parts.append(
            f'<span class="ctx" title="context: input only, no loss">{html.escape(v.context, quote=False)}</span>'
        )
    for i in range(v.shown):
        parts.append(_span(v.texts[i], v.ids[i], v.policy[i], v.ref[i], v.selected[i], v.valid[i], vmax, ref_hard))
    parts.append("</div>")
    if v.shown < len(v.texts):
        parts.append(f'<p class="note">{len(v.texts) - v.shown} more tokens not shown (--max-tokens)</p>')
    parts.append("</div>")
    return "".join(parts)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if math.isfinite(x) else "n/a"


def _num(x: float) -> str:
    return f"{x:+.3f}" if math.isfinite(x) else "n/a"


def _k(d: dict) -> str:
    return f"{d['k']:g}" if isinstance(d.get("k"), (int, float)) else "n/a"


def _dump_label(d: dict) -> str:
    label = d.get("label")
    it = d.get("iteration")
    return f"iteration {it}" + (f" ({label})" if label else "") if it is not None else (label or "dump")


def _even_subset(n: int, cap: int | None) -> list[int]:
    """``cap`` indices spread evenly over ``range(n)``, first and last included."""
    if not cap or n <= cap:
        return list(range(n))
    if cap == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (cap - 1)) for i in range(cap)})


def _seq_key(seq: dict) -> tuple:
    return tuple(int(x) for x in torch.as_tensor(seq["tokens"]).reshape(-1).tolist())


def render_html(
    dumps: list[dict] | dict,
    tokenizer=None,
    title: str = "SLM token selection",
    max_sequences: int | None = 4,
    max_tokens: int | None = 512,
    max_dumps: int | None = 8,
    vmax: float | None = None,
    layout: str = "auto",
    ref_hard_loss: float | None = None,
) -> str:
    """A self-contained HTML page showing the selection of one or several dumps (see the module docstring).

    ``tokenizer``: a Tokenizer / sentencepiece processor / path; default: the dumps' own tokenizer path
    (token ids when it cannot be loaded). Caps: ``max_sequences`` per dump, ``max_tokens`` per sequence,
    ``max_dumps`` dumps (spread evenly, first and last kept); each cap leaves a note on the page.
    ``vmax``: colour range of the excess loss (default: the 98th percentile of |excess| on the page).
    ``layout``: ``by_dump`` (a section per dump, after the sequences found in several dumps side by side),
    ``by_sequence`` (only the side-by-side view; for dumps that all hold the same sequences) or ``auto``.
    ``ref_hard_loss``: unselected tokens with a reference loss above it get a dashed box (default: the 75th
    percentile of the reference loss over the scored tokens shown).
    """
    if isinstance(dumps, dict):
        dumps = [dumps]
    if not dumps:
        raise ValueError("no selection dumps to render")
    tok = _load_tokenizer_for(dumps, tokenizer)
    keep = _even_subset(len(dumps), max_dumps)
    shown = [dumps[i] for i in keep]
    views = [[seq_view(s, tok, max_tokens) for s in d["sequences"][: max_sequences or None]] for d in shown]
    if vmax is None:
        vmax = color_scale(v for vs in views for v in vs)

    ks = sorted({d.get("k") for d in shown if d.get("k") is not None})
    scopes = sorted({str(d.get("scope")) for d in shown if d.get("scope") is not None})
    iters = [d.get("iteration") for d in shown]
    allstats = dump_stats(v for vs in views for v in vs)
    ref_hard = ref_hard_loss if ref_hard_loss is not None else _ref_quantile(views, 0.75)
    n_hard = sum(
        1
        for vs in views
        for v in vs
        for r, s, ok in zip(v.ref[: v.shown], v.selected[: v.shown], v.valid[: v.shown])
        if ok and not s and r > ref_hard
    )
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>"
        + CSS.replace("%NEG%", _hex(NEG_RGB)).replace("%MID%", _hex(MID_RGB)).replace("%POS%", _hex(POS_RGB))
        + "</style></head><body>",
        f"<header><h1>{html.escape(title)}</h1>",
        f'<p class="meta">k = {html.escape(", ".join(f"{k:g}" for k in ks) or "n/a")} &middot; '
        f"scope = {html.escape(', '.join(scopes) or 'n/a')} &middot; "
        f"iteration{'s' if len(iters) > 1 else ''} {html.escape(', '.join(str(i) for i in iters))} &middot; "
        f"selected fraction {_pct(allstats['fraction'])} of the {allstats['valid']} scored tokens "
        "in the sequences shown</p></header>",
    ]
    out.append(
        '<div class="legend"><span>excess loss = policy loss &minus; reference loss: '
        f'<b>{-vmax:+.2f}</b> <span class="bar"></span> <b>{vmax:+.2f}</b> (clipped)</span>'
        '<span><span class="key sel" style="background:#f4a582">selected</span> &nbsp;'
        '<span class="key" style="background:#d1e5f0">not selected</span> &nbsp;'
        '<span class="key masked">masked (EOD/pad)</span> &nbsp;'
        f'<span class="key rhard">not selected, reference loss &gt; {ref_hard:.2f}</span> '
        f"({n_hard} tokens: the reference is bad at them, so SLM leaves them out)</span>"
        "<span>hover a token for its losses</span>"
        '<label><input type="checkbox" onchange="document.body.classList.toggle(\'fade\',this.checked)"> '
        "fade unselected tokens</label></div>"
    )
    out.append(
        '<p class="meta">Each token is the one predicted at its position (the label); red tokens are those the '
        "policy predicts worse than the reference (high excess loss, what SLM trains on), blue ones it already "
        "predicts better. Newlines show as &#8629;.</p>"
    )
    notes = []
    if len(keep) < len(dumps):
        notes.append(f"{len(dumps) - len(keep)} of {len(dumps)} dumps not shown (--max-dumps {max_dumps}).")
    dropped = sum(max(len(d["sequences"]) - (max_sequences or len(d["sequences"])), 0) for d in shown)
    if dropped:
        notes.append(f"{dropped} sequences not shown (--max-sequences {max_sequences}).")
    for n in notes:
        out.append(f'<p class="note">{html.escape(n)}</p>')

    if len(shown) > 1:  # a per-dump summary table: how selection moves over training
        out.append(
            "<table><tr><th>dump</th><th>k</th><th>selected</th><th>excess sel.</th><th>excess unsel.</th>"
            "<th>policy loss</th><th>ref loss</th></tr>"
        )
        for d, vs in zip(shown, views):
            s = dump_stats(vs)
            out.append(
                f"<tr><td>{html.escape(_dump_label(d))}</td><td>{_k(d)}</td>"
                f"<td>{_pct(s['fraction'])}</td><td>{_num(s['excess_selected'])}</td>"
                f"<td>{_num(s['excess_unselected'])}</td><td>{s['policy_loss']:.3f}</td><td>{s['ref_loss']:.3f}</td></tr>"
            )
        out.append("</table>")

    # Sequences present in several dumps (same tokens): how their selection changed, side by side.
    where: dict[tuple, list[tuple[int, int]]] = {}
    for di, d in enumerate(shown):
        for si, s in enumerate(d["sequences"][: max_sequences or None]):
            where.setdefault(_seq_key(s), []).append((di, si))
    repeated = [locs for locs in where.values() if len({di for di, _ in locs}) > 1]
    keys = [[_seq_key(s) for s in d["sequences"][: max_sequences or None]] for d in shown]
    if layout == "auto":  # every dump holds the same sequences (checkpoints scored on one text): no repeats
        layout = "by_sequence" if len(shown) > 1 and all(k == keys[0] for k in keys) else "by_dump"
    if layout not in ("by_dump", "by_sequence"):
        raise ValueError(f"layout {layout!r}: use auto, by_dump or by_sequence")
    if repeated:
        out.append('<section class="tracked"><h2>Same sequences across iterations</h2>')
        for n, locs in enumerate(repeated):
            for di, si in locs:
                out.append(
                    _sequence_html(views[di][si], vmax, f"sequence {n + 1} at {_dump_label(shown[di])}", ref_hard)
                )
        out.append("</section>")
    if layout == "by_sequence":
        return "\n".join(out + ["</body></html>"])

    for d, vs in zip(shown, views):
        s = dump_stats(vs)
        out.append(
            f'<section class="dump" data-iteration="{html.escape(str(d.get("iteration")))}">'
            f"<h2>{html.escape(_dump_label(d))}</h2>"
            f'<p class="meta">k = {_k(d)} &middot; scope = {html.escape(str(d.get("scope")))} '
            f"&middot; selected {s['selected']} of {s['valid']} scored tokens ({_pct(s['fraction'])}) &middot; "
            f"mean excess selected {_num(s['excess_selected'])}, unselected {_num(s['excess_unselected'])}</p>"
        )
        for si, v in enumerate(vs):
            out.append(_sequence_html(v, vmax, f"sequence {si}", ref_hard))
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# PNG (matplotlib)


def _png_text(t: str) -> str:
    """Visible single-line text of a token for the PNG (newline shown as the return glyph)."""
    t = t.replace("\t", "    ").replace("\r", "\\r")
    return "".join(ch if ch.isprintable() or ch == " " else f"\\x{ord(ch):02x}" for ch in t) if t else "\u00b7"


def render_png(
    dump: dict,
    out_path,
    tokenizer=None,
    max_sequences: int = 2,
    max_tokens: int = 256,
    cols: int = 100,
    vmax: float | None = None,
    fontsize: float = 9.0,
    dpi: int = 130,
) -> Path:
    """One dump's heatmap as a PNG: monospaced tokens on their excess-loss colour, selected ones underlined."""
    import warnings

    matplotlib = require("matplotlib", "the heatmap's PNG (--png)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.patches import Rectangle

    tok = _load_tokenizer_for([dump], tokenizer)
    views = [seq_view(s, tok, max_tokens) for s in dump["sequences"][:max_sequences]]
    if not views:
        raise ValueError("the dump holds no sequences")
    if vmax is None:
        vmax = color_scale(views)

    # Lay tokens out on a grid of character cells, wrapping at `cols`.
    cells = []  # (row, col, width, text, view, i)
    row = 0
    heads = []
    for vi, v in enumerate(views):
        heads.append(row)
        row += 1  # heading line
        col = 0
        for i in range(v.shown):
            raw = v.texts[i]
            pieces = raw.split("\n")
            for j, piece in enumerate(pieces):
                last = j == len(pieces) - 1
                shown = "\u21b5" if not last and not piece else _png_text(piece) + ("" if last else "\u21b5")
                if not last or piece or len(pieces) == 1:
                    w = min(len(shown), cols)
                    if col + w > cols:
                        row, col = row + 1, 0
                    cells.append((row, col, w, shown[:w], vi, i))
                    col += w
                if not last:
                    row, col = row + 1, 0
        row += 2  # blank line between sequences
    n_rows = row - 1

    char_w = 0.602 * fontsize / 72  # DejaVu Sans Mono advance, inches
    line_h = 1.75 * fontsize / 72
    margin = 0.3
    legend_h = 1.15
    fig_w = cols * char_w + 2 * margin
    fig_h = n_rows * line_h + 2 * margin + legend_h
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    ax = fig.add_axes([margin / fig_w, (margin + legend_h) / fig_h, cols * char_w / fig_w, n_rows * line_h / fig_h])
    ax.set_xlim(0, cols)
    ax.set_ylim(n_rows, 0)
    ax.axis("off")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs missing from the font
        for vi, h in enumerate(heads):
            st = views[vi].stats()
            ax.text(
                0,
                h + 0.5,
                f"sequence {vi}: {st['selected']} of {st['valid']} scored tokens selected "
                f"({_pct(st['fraction'])}); mean excess selected {_num(st['excess_selected'])}, unselected "
                f"{_num(st['excess_unselected'])}",
                va="center",
                ha="left",
                fontsize=fontsize,
                color="#333",
                parse_math=False,
                fontweight="bold",
            )
        for r, c, w, text, vi, i in cells:
            v = views[vi]
            valid, sel = v.valid[i], v.selected[i]
            rgb = excess_color(v.policy[i] - v.ref[i], vmax) if valid else None
            if valid:  # a hair's gap between tokens shows where each one ends
                ax.add_patch(
                    Rectangle(
                        (c + 0.04, r + 0.08), w - 0.08, 0.84, facecolor=tuple(x / 255 for x in rgb), edgecolor="none"
                    )
                )
            else:
                ax.add_patch(
                    Rectangle((c + 0.04, r + 0.08), w - 0.08, 0.84, facecolor="#eeeeee", edgecolor="none", hatch="////")
                )
            if sel:
                ax.plot(
                    [c + 0.05, c + w - 0.05], [r + 0.9, r + 0.9], color="#111", linewidth=1.6, solid_capstyle="butt"
                )
            ax.text(
                c,
                r + 0.5,
                text,
                family="DejaVu Sans Mono",
                fontsize=fontsize,
                va="center",
                ha="left",
                color="#888" if not valid else ("#fff" if _dark(rgb) else "#111"),
                fontweight="bold" if sel else "normal",
                parse_math=False,
            )
    cmap = LinearSegmentedColormap.from_list("excess", [tuple(x / 255 for x in c) for c in (NEG_RGB, MID_RGB, POS_RGB)])
    fig.text(
        margin / fig_w,
        (legend_h - 0.12) / fig_h,
        f"iteration {dump.get('iteration')}, k = {dump.get('k')}, scope = {dump.get('scope')}   |   "
        "bold underlined = selected, hatched grey = masked (EOD)",
        fontsize=fontsize - 0.5,
        va="center",
        parse_math=False,
    )
    cax = fig.add_axes([margin / fig_w, 0.5 * legend_h / fig_h, min(3.5, cols * char_w * 0.5) / fig_w, 0.15 / fig_h])
    sm = matplotlib.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(-vmax, vmax))
    cb = fig.colorbar(sm, cax=cax, orientation="horizontal", format="%+.2g")
    cb.ax.tick_params(labelsize=fontsize - 1.5)
    cb.set_label("excess loss = policy loss - reference loss (nats)", fontsize=fontsize - 1.5)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=dpi)
    plt.close(fig)
    return out_path


# ----------------------------------------------------------------------------------------------
# slm viz: the dumps of either source, the page and the PNG

TITLES = {"dumps": "SLM token selection during training", "checkpoints": "SLM token selection (policy vs reference)"}


def read_texts(items: Sequence[str]) -> list[str]:
    """The documents of ``--text``: each item a file (``.jsonl``: one document per line's "text"; any other
    file: one document) or, when no such file exists, the text itself. Empty documents are dropped."""
    texts = []
    for item in items:
        p = Path(item)
        if len(item) < 4096 and "\n" not in item and p.is_file():
            if p.suffix == ".jsonl":
                for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                    if line.strip():
                        obj = json.loads(line)
                        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                            raise ConfigError(f'{p}:{n} has no "text" string')
                        texts.append(obj["text"])
            else:
                texts.append(p.read_text(encoding="utf-8"))
        else:
            texts.append(item)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ConfigError("--text gave no non-empty document")
    return texts


def selection_dumps(
    dump: Sequence[str] | None = None,
    policy: Sequence[str] | None = None,
    reference: str | None = None,
    text: Sequence[str] | None = None,
    tokenizer: str | None = None,
    k: float = 0.6,
    seq_length: int | None = None,
    scope: str = "document",
) -> list[dict]:
    """The dumps ``slm viz`` shows: (a) ``load_dumps(dump)``, written during training, or (b) computed here by
    ``text_selection.compute_selection`` from the ``policy`` checkpoint(s) and the ``reference`` on ``text``
    (files or texts, see ``read_texts``) with ``tokenizer``. Raises ConfigError for a mix of both sources or an
    incomplete (b); FileNotFoundError / ValueError (a) and SLMError / ValueError (b) for unusable inputs."""
    if bool(dump) == bool(policy):
        raise ConfigError("give either --dump (source a) or --policy/--reference/--text/--tokenizer (source b)")
    if dump:
        return load_dumps(dump)
    given = {"reference": reference, "text": text, "tokenizer": tokenizer}
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise ConfigError("checkpoint mode needs " + ", ".join(f"--{m}" for m in missing))
    from megatron_slm.analysis.text_selection import compute_selection

    return compute_selection(policy, reference, read_texts(text), tokenizer, k=k, seq_length=seq_length, scope=scope)


def write_heatmap(
    dumps: list[dict],
    out,
    tokenizer=None,
    title: str = TITLES["dumps"],
    max_sequences: int | None = 4,
    max_tokens: int | None = 512,
    max_dumps: int | None = 8,
    vmax: float | None = None,
    layout: str = "auto",
    png=None,
    png_dump: int = -1,
    png_sequences: int = 2,
    png_tokens: int = 256,
    ref_hard_loss: float | None = None,
) -> list[str]:
    """``render_html`` of ``dumps`` written to ``out`` (folders created), and with ``png`` also ``render_png`` of
    the ``png_dump``-th dump the page shows; returns one "wrote ..." line per file."""
    page = render_html(
        dumps,
        tokenizer=tokenizer,
        title=title,
        max_sequences=max_sequences,
        max_tokens=max_tokens,
        max_dumps=max_dumps,
        vmax=vmax,
        layout=layout,
        ref_hard_loss=ref_hard_loss,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    lines = [f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB, {len(dumps)} dump(s))"]
    if png:
        shown = [dumps[i] for i in _even_subset(len(dumps), max_dumps)]
        written = render_png(
            shown[png_dump], png, tokenizer=tokenizer, max_sequences=png_sequences, max_tokens=png_tokens, vmax=vmax
        )
        lines.append(f"wrote {written}")
    return lines
