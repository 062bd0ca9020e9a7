"""Tokenizers for preprocessing and training: a SentencePiece ``.model`` or a Hugging Face ``tokenizer.json``.

``load_tokenizer(path)`` returns a ``Tokenizer`` with one interface over both kinds:

    vocab_size   int, every id the tokenizer can emit (for tokenizer.json: incl. added tokens)
    eod          id appended after each document (sentencepiece: its eos id; tokenizer.json: a known
                 end token such as ``</s>`` or ``<|endoftext|>``; or the ``eod_token`` argument)
    bos          id or None;  pad: a real pad id distinct from eod/bos, else -1 (never in the data)
    encode(text) -> list[int]   no BOS/EOS added (raw sentencepiece ids for a .model)
    decode(ids)  -> str
    path, kind ('sentencepiece' | 'huggingface'), fingerprint (sha256 of the file's bytes)

It also duck-types what megatron-core's GPTDataset / MegatronDataset read from ``config.tokenizer``
(``eod``, ``pad``, ``eos``, ``vocab_size``, ``unique_identifiers`` for the dataset cache hash,
``tokenize``/``detokenize``, ``vocab``/``inv_vocab``). It pickles as the file's bytes plus options, so
worker processes rebuild the same tokenizer without touching the file system.
"""

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from megatron_slm.errors import TokenizerError, require

EXPECTED = "expected a sentencepiece .model or a Hugging Face tokenizer.json"

# Tried in this order when a tokenizer.json does not say which token ends a document.
EOD_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")

SENTENCEPIECE, HUGGINGFACE = "sentencepiece", "huggingface"


class Tokenizer:
    """One tokenizer file (see the module docstring). Build it with ``load_tokenizer``."""

    def __init__(self, path, data: bytes, kind: str, eod_token: str | int | None = None):
        self.path = str(path)
        self.kind = kind
        self.eod_token = eod_token
        self._data = data
        self.fingerprint = hashlib.sha256(data).hexdigest()
        self._vocab = None
        if kind == SENTENCEPIECE:
            self._init_sentencepiece()
        elif kind == HUGGINGFACE:
            self._init_huggingface()
        else:
            raise TokenizerError(f"tokenizer {self.path}: unknown kind {kind!r}; {EXPECTED}")
        if not 0 <= self.eod < self.vocab_size:
            raise TokenizerError(
                f"tokenizer {self.path}: eod id {self.eod} is outside the vocabulary [0, {self.vocab_size})"
            )

    # ----------------------------------------------------------------------------------------- loading
    def _init_sentencepiece(self):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(self._data)
        except Exception:  # RuntimeError / OSError from the C++ parser
            raise TokenizerError(f"tokenizer {self.path} is not a readable sentencepiece model; {EXPECTED}") from None
        self._sp, self._hf = sp, None
        self.vocab_size = int(sp.get_piece_size())
        if self.vocab_size <= 0:
            raise TokenizerError(f"tokenizer {self.path} has an empty vocabulary; {EXPECTED}")
        if self.eod_token is not None:
            self.eod = self._explicit_id(self.eod_token, sp.piece_to_id, unk=sp.unk_id())
        elif sp.eos_id() >= 0:
            self.eod = int(sp.eos_id())
        else:
            raise TokenizerError(
                f"sentencepiece model {self.path} defines no eos token to end documents; "
                f"pass eod_token (a piece or an id)"
            )
        self.bos = int(sp.bos_id()) if sp.bos_id() >= 0 else None
        pad = int(sp.pad_id())
        self.pad = pad if pad >= 0 and pad not in (self.eod, self.bos) else -1

    def _init_huggingface(self):
        HFTokenizer = require("tokenizers", f"tokenizer {self.path} (a tokenizer.json)").Tokenizer
        try:
            text = self._data.decode("utf-8")
            json.loads(text)
        except ValueError as e:
            raise TokenizerError(f"tokenizer {self.path} is not valid JSON ({_one_line(e)}); {EXPECTED}") from None
        try:
            hf = HFTokenizer.from_str(text)
        except Exception:  # the Rust parser raises a bare Exception
            raise TokenizerError(
                f"tokenizer {self.path} is JSON but not a Hugging Face tokenizer; {EXPECTED}"
            ) from None
        self._sp, self._hf = None, hf
        vocab = hf.get_vocab(with_added_tokens=True)
        if not vocab:
            raise TokenizerError(f"tokenizer {self.path} has an empty vocabulary; {EXPECTED}")
        self.vocab_size = int(max(hf.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1))
        if self.eod_token is not None:
            self.eod = self._explicit_id(self.eod_token, hf.token_to_id)
        else:
            found = [t for t in EOD_CANDIDATES if t in vocab]
            if not found:
                raise TokenizerError(
                    f"tokenizer {self.path} has none of the end-of-document tokens "
                    f"{', '.join(EOD_CANDIDATES)}; pass eod_token (a token or an id)"
                )
            self.eod = int(vocab[found[0]])
        bos = [vocab[t] for t in BOS_CANDIDATES if t in vocab]
        self.bos = int(bos[0]) if bos else None
        pad = [vocab[t] for t in PAD_CANDIDATES if t in vocab and vocab[t] not in (self.eod, self.bos)]
        self.pad = int(pad[0]) if pad else -1

    def _explicit_id(self, token, to_id, unk=None) -> int:
        if isinstance(token, int) or (isinstance(token, str) and token.isdigit()):
            i = int(token)
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(
                    f"eod_token {token} is outside the vocabulary [0, {self.vocab_size}) of {self.path}"
                )
            return i
        i = to_id(token)
        if i is None or (unk is not None and i == unk and token != "<unk>"):
            raise TokenizerError(f"eod_token {token!r} is not a token of {self.path}")
        return int(i)

    # ------------------------------------------------------------------------------------------ coding
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS or EOS is added."""
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    # megatron-core's tokenizer names
    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.decode(ids)

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def vocab(self) -> dict:
        """Token string -> id."""
        if self._vocab is None:
            if self._sp is not None:
                self._vocab = {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}
            else:
                self._vocab = dict(self._hf.get_vocab(with_added_tokens=True))
        return self._vocab

    @property
    def inv_vocab(self) -> dict:
        return {i: t for t, i in self.vocab.items()}

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        """What megatron-core's dataset cache hash records about the tokenizer (the file's content, not its path)."""
        return OrderedDict(
            [
                ("class", type(self).__name__),
                ("kind", self.kind),
                ("fingerprint", self.fingerprint),
                ("vocab_size", self.vocab_size),
                ("eod", self.eod),
                ("pad", self.pad),
            ]
        )

    def describe(self) -> dict:
        """The tokenizer's identity as JSON-able metadata (written beside preprocessed data)."""
        return {
            "tokenizer": self.path,
            "tokenizer_kind": self.kind,
            "tokenizer_fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "eod_token_id": self.eod,
            "bos_token_id": self.bos,
        }

    # ---------------------------------------------------------------------------------------- pickling
    def __getstate__(self):
        return {"path": self.path, "data": self._data, "kind": self.kind, "eod_token": self.eod_token}

    def __setstate__(self, state):
        self.__init__(state["path"], state["data"], state["kind"], state["eod_token"])

    def __repr__(self):
        return (
            f"Tokenizer({self.kind}, {self.path!r}, vocab_size={self.vocab_size}, eod={self.eod}, "
            f"bos={self.bos}, pad={self.pad})"
        )


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return (msg[:200] + "...") if len(msg) > 200 else (msg or type(e).__name__)


def load_tokenizer(path, eod_token: str | int | None = None) -> Tokenizer:
    """Load a SentencePiece ``.model`` or a Hugging Face ``tokenizer.json`` (``TokenizerError`` otherwise).

    The kind comes from the suffix (``.model`` / ``.json``) or, for any other name, from the content (a JSON
    object is taken as a tokenizer.json). ``eod_token`` (a token string or an id) overrides the
    end-of-document token, which is otherwise the model's eos (sentencepiece) or a known end token
    (tokenizer.json)."""
    p = Path(path)
    if not p.exists():
        raise TokenizerError(f"tokenizer file {p} does not exist; {EXPECTED}")
    if not p.is_file():
        raise TokenizerError(f"tokenizer path {p} is not a file; {EXPECTED}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise TokenizerError(f"tokenizer file {p} cannot be read ({_one_line(e)}); {EXPECTED}") from None
    if not data:
        raise TokenizerError(f"tokenizer file {p} is empty; {EXPECTED}")
    suffix = p.suffix.lower()
    if suffix == ".json":
        kind = HUGGINGFACE
    elif suffix == ".model":
        kind = SENTENCEPIECE
    else:
        kind = HUGGINGFACE if data.lstrip()[:1] == b"{" else SENTENCEPIECE
    return Tokenizer(p, data, kind, eod_token=eod_token)
