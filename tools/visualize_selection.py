#!/usr/bin/env python
"""Per-token SLM selection heatmap: every token coloured by its excess loss, the selected ones marked.

Two sources, one self-contained HTML page (``--out``; open it in any browser, hover a token for its losses):

  # (a) selection dumps written during training (--selection-dump-interval N --save DIR)
  python tools/visualize_selection.py --dump runs/slm --out selection.html
  python tools/visualize_selection.py --dump runs/slm/selection_dumps/iter_0000100.pt --out it100.html

  # (b) computed here from checkpoints on CPU (TP=1, PP=1): policy (one or several) vs reference on some text
  python tools/visualize_selection.py --policy runs/slm --reference runs/reference \\
      --tokenizer data/tokenizer.model --text notes.txt --slm-select-ratio 0.6 --out page.html

``--text`` is a file (``.jsonl``: one document per line's "text"; other files: one document) or, if no such
file exists, the text itself; repeat it for several documents. ``--png FILE`` also draws the first shown
dump (the last one for a directory) as a PNG with matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def read_texts(items: list[str]) -> list[str]:
    texts = []
    for item in items:
        p = Path(item)
        if len(item) < 4096 and "\n" not in item and p.is_file():
            if p.suffix == ".jsonl":
                for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                    if line.strip():
                        obj = json.loads(line)
                        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                            raise SystemExit(f'error: {p}:{n} has no "text" string')
                        texts.append(obj["text"])
            else:
                texts.append(p.read_text(encoding="utf-8"))
        else:
            texts.append(item)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise SystemExit("error: --text gave no non-empty document")
    return texts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="visualize_selection", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_argument_group("source (a): selection dumps")
    src.add_argument(
        "--dump",
        nargs="+",
        metavar="DIR_OR_FILE",
        help="run directory, its selection_dumps/ directory, or iter_*.pt files",
    )
    ck = p.add_argument_group("source (b): checkpoints + text")
    ck.add_argument("--policy", nargs="+", metavar="CKPT", help="policy checkpoint(s); several = one section each")
    ck.add_argument("--reference", metavar="CKPT", help="reference checkpoint")
    ck.add_argument("--text", nargs="+", metavar="FILE_OR_TEXT", help="documents to score")
    ck.add_argument(
        "--slm-select-ratio",
        dest="k",
        type=float,
        default=0.6,
        help="k: fraction of the scored tokens selected (default 0.6)",
    )
    ck.add_argument(
        "--select-over",
        choices=("document", "batch"),
        default="document",
        help="top-k over each document, or over all texts together as one batch (default document)",
    )
    ck.add_argument("--seq-length", type=int, default=None, help="window length (default: the models' max positions)")
    p.add_argument(
        "--tokenizer",
        help="tokenizer (.model / tokenizer.json); with checkpoints: the one they were trained "
        "with (its sha256 is checked against theirs); default for dumps: the path "
        "they recorded",
    )
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--title", default=None)
    p.add_argument("--max-sequences", type=int, default=4, help="sequences shown per dump (0 = all)")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens shown per sequence (0 = all)")
    p.add_argument("--max-dumps", type=int, default=8, help="dumps shown, spread over training (0 = all)")
    p.add_argument(
        "--vmax", type=float, default=None, help="colour range of the excess loss (default: 98th pct of |excess|)"
    )
    p.add_argument(
        "--layout",
        choices=("auto", "by_dump", "by_sequence"),
        default="auto",
        help="by_sequence: each sequence at every dump/checkpoint side by side "
        "(auto: when all hold the same sequences)",
    )
    p.add_argument("--png", default=None, help="also write a PNG of one dump (matplotlib)")
    p.add_argument("--png-dump", type=int, default=-1, help="which shown dump the PNG draws (index; default last)")
    p.add_argument("--png-sequences", type=int, default=2)
    p.add_argument("--png-tokens", type=int, default=256)
    args = p.parse_args(argv)

    from megatron_slm.analysis.heatmap import _even_subset, load_dumps, render_html, render_png
    from megatron_slm.analysis.text_selection import compute_selection

    if bool(args.dump) == bool(args.policy):
        p.error("give either --dump (source a) or --policy/--reference/--text/--tokenizer (source b)")
    if args.dump:
        try:
            dumps = load_dumps(args.dump)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        title = args.title or "SLM token selection during training"
    else:
        missing = [f for f in ("reference", "text", "tokenizer") if not getattr(args, f)]
        if missing:
            p.error("checkpoint mode needs " + ", ".join(f"--{m}" for m in missing))
        import warnings

        from megatron_slm.errors import SLMError

        warnings.filterwarnings("ignore", message="Transformer Engine and Apex")  # megatron-core on CPU
        warnings.filterwarnings("ignore", category=FutureWarning)  # dist_checkpointing's torch deprecations

        try:
            dumps = compute_selection(
                args.policy,
                args.reference,
                read_texts(args.text),
                args.tokenizer,
                k=args.k,
                seq_length=args.seq_length,
                scope=args.select_over,
            )
        except (SLMError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        title = args.title or "SLM token selection (policy vs reference)"
    page = render_html(
        dumps,
        tokenizer=args.tokenizer,
        title=title,
        max_sequences=args.max_sequences or None,
        max_tokens=args.max_tokens or None,
        max_dumps=args.max_dumps or None,
        vmax=args.vmax,
        layout=args.layout,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB, {len(dumps)} dump(s))")
    if args.png:
        shown = [dumps[i] for i in _even_subset(len(dumps), args.max_dumps or None)]
        png = render_png(
            shown[args.png_dump],
            args.png,
            tokenizer=args.tokenizer,
            max_sequences=args.png_sequences,
            max_tokens=args.png_tokens,
            vmax=args.vmax,
        )
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
