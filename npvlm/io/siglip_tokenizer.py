"""Text in for SigLIP: the ids and attention mask HF's `SiglipTokenizer` produces with
`padding="max_length", truncation=True` (how the model was trained; SPEC.md §13).

What SiglipTokenizer does on top of the raw SentencePiece model (transformers 5
`tokenization_siglip.py`), and npvlm copies:
  * "\u2581" is prefixed to the text (and any "\u2581" in it becomes a space);
  * the special tokens' strings ("</s>", "<unk>", "<pad>") written in the text are matched first and
    become single ids, the whitespace around them stripped (AddedToken lstrip/rstrip);
  * each remaining chunk is canonicalised: lower-cased (`do_lower_case`, default true), ASCII
    punctuation (`string.punctuation`) removed, whitespace runs collapsed to one space, stripped;
  * it is encoded as "<unk>" + chunk with the "<unk>" pieces cut off (so SentencePiece's dummy prefix
    does not apply), and a leading lone "\u2581" before a special token is dropped;
  * "</s>" is appended unless already last; truncation keeps max_length - 1 ids then "</s>";
  * padding to max_length (`model_max_length`, default 64) with the pad token ("</s>" by default).
"""

from __future__ import annotations

import os
import re
import string

from ..errors import TokenizerError, show
from .files import read_json_object
from .tokenizer import as_text
from .tokenizer_engines import read_tokenizer_file
from .spm_proto import modelproto_problem

SPIECE_UNDERLINE = "\u2581"
_PUNCT = str.maketrans("", "", string.punctuation)


def canonicalize_text(text: str, lower: bool = True) -> str:
    """HF `SiglipTokenizer.canonicalize_text` (big_vision's): lower-case, drop punctuation, collapse whitespace."""
    if lower:
        text = text.lower()
    return re.sub(r"\s+", " ", text.translate(_PUNCT)).strip()


class SiglipTokenizer:
    """Build with `SiglipTokenizer.from_dir(model_dir)` (spiece.model + tokenizer_config.json)."""

    def __init__(self, sp, path: str, *, max_length: int = 64, do_lower_case: bool = True,
                 eos_token: str = "</s>", pad_token: str = "</s>", unk_token: str = "<unk>"):
        self.sp, self.path, self.max_length, self.do_lower_case = sp, path, int(max_length), bool(do_lower_case)
        self.vocab_size = sp.get_piece_size()
        ids = {}
        for name, tok in (("eos_token", eos_token), ("pad_token", pad_token), ("unk_token", unk_token)):
            i = sp.piece_to_id(tok)
            if not (0 <= i < self.vocab_size and sp.id_to_piece(i) == tok):
                raise TokenizerError(f"{path}: {name} {show(tok)} is not a piece of the SentencePiece model")
            ids[name] = i
        self.eos_id, self.pad_id, self.unk_id = ids["eos_token"], ids["pad_token"], ids["unk_token"]
        self.unk_token = unk_token
        self.special = {eos_token: self.eos_id, pad_token: self.pad_id, unk_token: self.unk_id}
        self._split = re.compile(r"\s*(" + "|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True)) + r")\s*")
        self._unk_len = len(sp.encode(unk_token, out_type=str))
        if self.max_length < 1:
            raise TokenizerError(f"{path}: model_max_length must be >= 1, got {self.max_length}")

    @classmethod
    def from_dir(cls, model_dir, *, max_length: int | None = None) -> "SiglipTokenizer":
        path = os.path.join(os.fspath(model_dir), "spiece.model")
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: not found (a SigLIP model folder holds a SentencePiece spiece.model)")
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
            raise TokenizerError(f"{path}: not a usable SentencePiece model ({str(e).strip()[:200] or type(e).__name__})") from None
        kw = {}
        cfg_path = os.path.join(os.fspath(model_dir), "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            d = read_json_object(cfg_path, TokenizerError, limit=64 << 20)
            for key in ("eos_token", "pad_token", "unk_token"):
                v = d.get(key)
                v = v.get("content") if isinstance(v, dict) else v
                if isinstance(v, str):
                    kw[key] = v
            if isinstance(d.get("do_lower_case"), bool):
                kw["do_lower_case"] = d["do_lower_case"]
            ml = d.get("model_max_length")
            if isinstance(ml, int) and not isinstance(ml, bool) and 0 < ml <= 1 << 20:
                kw["max_length"] = ml
        if max_length is not None:
            kw["max_length"] = max_length
        return cls(sp, path, **kw)

    def _pieces(self, chunk: str) -> list[str]:  # HF `_tokenize`
        chunk = canonicalize_text(chunk, self.do_lower_case)
        pieces = self.sp.encode(self.unk_token + chunk, out_type=str)
        return pieces[self._unk_len:] if len(pieces) >= self._unk_len else pieces

    def tokenize(self, text) -> list[str]:
        """Pieces (no "</s>" appended), as HF `SiglipTokenizer.tokenize`."""
        text = SPIECE_UNDERLINE + as_text(text, "text").replace(SPIECE_UNDERLINE, " ")
        out = []
        for k, part in enumerate(self._split.split(text)):
            if k % 2:
                out.append(part)  # a special token written in the text
            elif part:
                out.extend(self._pieces(part))
        if len(out) > 1 and out[0] == SPIECE_UNDERLINE and out[1] in self.special:
            out = out[1:]
        return out

    def encode(self, text) -> list[int]:
        """Ids with "</s>" appended, neither truncated nor padded."""
        ids = [self.special[p] if p in self.special else self.sp.piece_to_id(p) for p in self.tokenize(text)]
        return ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id]

    def __call__(self, texts, max_length: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
        """(input_ids, attention_mask), each [len(texts)][max_length]: truncated, "</s>"-ended, padded."""
        L = self.max_length if max_length is None else int(max_length)
        if isinstance(texts, (str, bytes)):
            texts = [texts]
        ids, mask = [], []
        for t in texts:
            row = self.encode(t)
            if len(row) > L:
                # HF truncates the text to L - 1 ids and then appends "</s>" (an input already ending
                # in "</s>" keeps its first L ids of text + that "</s>" the same way)
                row = row[: L - 1] + [self.eos_id] if L > 1 else row[:L]
            ids.append(row + [self.pad_id] * (L - len(row)))
            mask.append([1] * len(row) + [0] * (L - len(row)))
        return ids, mask
