"""The two tokenizer file formats npvlm reads, each behind the same small interface (npvlm/io/tokenizer.py's
`Tokenizer` does what HF adds on top: special tokens matched in text, added tokens, skipping on decode).

    _SentencePiece   tokenizer.model (a SentencePiece ModelProto) through the `sentencepiece` library
    _HFTokenizers    tokenizer.json (an HF `tokenizers` file) through the `tokenizers` library

Each has: size, bos_id / eos_id (None: found by name), special_ids, split_tokens (pieces HF matches in text
that the library would spell out), split_added, added_flags (the pieces HF holds as added tokens -> their special
flag), and piece(i), piece_id(piece), encode(text), decode(ids, added).
"""

from __future__ import annotations

import json

from ..errors import TokenizerError
from .files import read_bytes
from .spm_proto import modelproto_problem, user_defined_ids

_MAX_FILE = 1 << 30  # refuse to read a "tokenizer" over 1 GiB


def _hf_byte_fallback_join(pieces) -> str:
    """Join decoded pieces; `int` items are bytes. A run of bytes that is not UTF-8 gives one U+FFFD per byte."""
    out, run = [], bytearray()
    for p in pieces + [""]:
        if isinstance(p, int):
            run.append(p)
            continue
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out.append("\ufffd" * len(run))
            run = bytearray()
        out.append(p)
    return "".join(out)


def read_tokenizer_file(path: str, what: str) -> bytes:
    return read_bytes(path, what, TokenizerError, limit=_MAX_FILE)



class _SentencePiece:
    """tokenizer.model through the `sentencepiece` library."""

    def __init__(self, sp, path, user_defined=frozenset()):
        self.sp, self.path, self.size = sp, path, sp.get_piece_size()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        # HF's converter makes the CONTROL pieces special added tokens and the USER_DEFINED ones plain added tokens;
        # the UNKNOWN piece is special only as the named unk_token (npvlm/io/special_tokens.py)
        ctrl = [i for i in range(self.size) if sp.is_control(i)]
        self.special_ids = frozenset(ctrl)
        self.split_tokens = {sp.id_to_piece(i): i for i in ctrl}  # HF matches these in text; SentencePiece does not
        self.split_added = True  # HF matches tokenizer_config.json's added tokens in text too
        self.added_flags = {sp.id_to_piece(i): False for i in user_defined if i < self.size} | dict.fromkeys(self.split_tokens, True)
        self._byte = {i: int(sp.id_to_piece(i)[3:5], 16) for i in range(self.size) if sp.is_byte(i)}

    @classmethod
    def load(cls, path):
        data = read_tokenizer_file(path, "SentencePiece model")
        problem = modelproto_problem(data)
        if problem:
            raise TokenizerError(f"{path}: could not parse ModelProto: {problem}")
        try:
            import sentencepiece as spm
        except ImportError:
            raise TokenizerError(f"{path}: the `sentencepiece` package is not installed (pip install sentencepiece)") from None
        try:
            sp = spm.SentencePieceProcessor(model_proto=data)
        except (RuntimeError, OSError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TokenizerError(f"{path}: not a usable SentencePiece model ({msg})") from None
        if sp.get_piece_size() == 0:
            raise TokenizerError(f"{path}: SentencePiece model has no pieces")
        return cls(sp, path, user_defined_ids(data))

    def piece(self, i):
        return self.sp.id_to_piece(i)

    def piece_id(self, piece):
        i = self.sp.piece_to_id(piece)
        return i if 0 <= i < self.size and self.sp.id_to_piece(i) == piece else None

    def encode(self, text):
        return list(self.sp.encode(text))

    def decode(self, ids, added):
        parts = []
        for i in ids:
            if i in added:
                parts.append(added[i][0].replace("\u2581", " "))
            elif i in self._byte:
                parts.append(self._byte[i])
            elif i < self.size:
                parts.append(self.sp.id_to_piece(i).replace("\u2581", " "))
        return _hf_byte_fallback_join(parts)


class _HFTokenizers:
    """tokenizer.json through the `tokenizers` library."""

    def __init__(self, tk, path):
        self.tk, self.path = tk, path
        self.size = tk.get_vocab_size(with_added_tokens=True)
        self.bos_id = self.eos_id = None  # found by name
        added = tk.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self.added_flags = {t.content: t.special for t in added.values()}
        self.split_tokens = {}  # the library matches its added tokens itself
        self.split_added = False

    @classmethod
    def load(cls, path):
        data = read_tokenizer_file(path, "tokenizer.json")
        try:
            text = data.decode("utf-8")
            json.loads(text)
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{path}: not UTF-8 text (byte offset {e.start}), not a tokenizer.json") from None
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # a 5000-digit number, 100k nested brackets
            raise TokenizerError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
        try:
            from tokenizers import Tokenizer as _TK
        except ImportError:
            raise TokenizerError(f"{path}: the `tokenizers` package is not installed (pip install tokenizers)") from None
        try:
            tk = _TK.from_str(text)
        except Exception as e:  # the library raises a bare Exception for a bad layout
            raise TokenizerError(f"{path}: not an HF tokenizers file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        return cls(tk, path)

    def piece(self, i):
        return self.tk.id_to_token(i)

    def piece_id(self, piece):
        return self.tk.token_to_id(piece)

    def encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, added):
        # ids here are already filtered; specials of the file itself are skipped by the library too
        extra = [i for i in ids if i in added and self.tk.id_to_token(i) is None]
        if not extra:
            return self.tk.decode(ids, skip_special_tokens=False)
        out, run = [], []
        for i in ids + [None]:
            if i is None or i in extra:
                if run:
                    out.append(self.tk.decode(run, skip_special_tokens=False))
                    run = []
                if i is not None:
                    out.append(added[i][0])
            else:
                run.append(i)
        return "".join(out)
