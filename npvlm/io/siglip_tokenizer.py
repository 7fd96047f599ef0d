"""Text in for SigLIP: the ids and attention mask HF's `SiglipTokenizer` produces with
`padding="max_length", truncation=True` (how the model was trained; SPEC.md §13).

What SiglipTokenizer does on top of the raw SentencePiece model (transformers 5
`tokenization_siglip.py`), and npvlm copies:
  * "\u2581" is prefixed to the text (and any "\u2581" in it becomes a space);
  * the special tokens' strings (eos / unk / pad, "</s>" "<unk>" "</s>" unless tokenizer_config.json or
    special_tokens_map.json rename them, with HF's precedence: npvlm/io/special_tokens.py; and the extra ones
    those files list; and tokenizer_config.json's added_tokens_decoder entries) written in the text are matched
    first and become single ids, the whitespace around them stripped (AddedToken lstrip/rstrip); a special one the
    SentencePiece model lacks gets the next new id, as HF appends it;
  * each remaining chunk is canonicalised: lower-cased (`do_lower_case`, default true), ASCII
    punctuation (`string.punctuation`) removed, whitespace runs collapsed to one space, stripped;
  * it is encoded as "<unk>" + chunk with the "<unk>" pieces cut off (so SentencePiece's dummy prefix
    does not apply), and a leading lone "\u2581" before a special token is dropped;
  * "</s>" is appended unless already last; truncation keeps the first max_length - 1 ids of text, then
    "</s>" unless they already end in one (HF reserves the room whether or not it adds it);
  * padding to max_length (`model_max_length`, default 64) with the pad token ("</s>" by default).
"""

from __future__ import annotations

import os
import re
import string

from ..errors import TokenizerError
from .special_tokens import SpecialTokens, read_added_tokens, read_special_tokens
from .tokenizer import as_text
from .tokenizer_engines import read_tokenizer_file
from .spm_proto import modelproto_problem

SPIECE_UNDERLINE = "\u2581"
_PUNCT = str.maketrans("", "", string.punctuation)
SIGLIP_DEFAULTS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}  # SiglipTokenizer's


def canonicalize_text(text: str, lower: bool = True) -> str:
    """HF `SiglipTokenizer.canonicalize_text` (big_vision's): lower-case, drop punctuation, collapse whitespace."""
    if lower:
        text = text.lower()
    return re.sub(r"\s+", " ", text.translate(_PUNCT)).strip()


class SiglipTokenizer:
    """Build with `SiglipTokenizer.from_dir(model_dir)` (spiece.model + tokenizer_config.json)."""

    def __init__(self, sp, path: str, *, max_length: int = 64, do_lower_case: bool = True,
                 eos_token: str = "</s>", pad_token: str = "</s>", unk_token: str = "<unk>",
                 special: SpecialTokens | None = None, added: dict | None = None):
        self.sp, self.path, self.max_length, self.do_lower_case = sp, path, int(max_length), bool(do_lower_case)
        st = special or SpecialTokens({"eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token})
        for key in SIGLIP_DEFAULTS:
            if key not in st.named:
                raise TokenizerError(f"{st.where(key)}: is null, but SigLIP's tokenizer cannot do without this token")
        # text -> id of what is matched whole in the text: added tokens (added_tokens_decoder), then the special ones
        self._matched = {t: i for i, (t, _) in sorted((added or {}).items(), reverse=True) if t}
        self.vocab_size = max([sp.get_piece_size()] + [i + 1 for i in (added or {})])
        self.special: dict[str, int] = {}  # token -> id: named ones, then extra ones (HF's order for new ids)
        self.appended: list[tuple[str, str, int]] = []  # (where, token, new id)
        for key, tok in list(st.named.items()) + [("extra_special_tokens", t) for t in st.extra]:
            i = self._matched.get(tok, sp.piece_to_id(tok))
            if tok not in self._matched and not (0 <= i < sp.get_piece_size() and sp.id_to_piece(i) == tok):
                i = self.vocab_size  # HF appends a special token the model lacks
                self.vocab_size += 1
                self.appended.append((st.where(key), tok, i))
            self.special.setdefault(tok, i)
            self._matched.setdefault(tok, i)
        self.unk_token = st.named["unk_token"]
        self.eos_id, self.pad_id, self.unk_id = (self.special[st.named[k]] for k in ("eos_token", "pad_token", "unk_token"))
        alts = sorted(self._matched, key=len, reverse=True)  # longest first = leftmost-longest match
        self._split = re.compile(r"\s*(" + "|".join(re.escape(t) for t in alts) + r")\s*")
        self._unk_len = len(sp.encode(self.unk_token, out_type=str))
        if self.max_length < 1:
            raise TokenizerError(f"{path}: model_max_length must be >= 1, got {self.max_length}")

    @classmethod
    def from_dir(cls, model_dir, *, max_length: int | None = None) -> "SiglipTokenizer":
        path = os.path.join(os.fspath(model_dir), "spiece.model")
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: not found (a SigLIP model folder holds a SentencePiece spiece.model)")
        st = read_special_tokens(os.fspath(model_dir), SIGLIP_DEFAULTS, sentencepiece_only=False)
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
        kw, d = {}, st.settings  # tokenizer_config.json, with special_tokens_map.json's keys over it when HF reads that
        if isinstance(d.get("do_lower_case"), bool):
            kw["do_lower_case"] = d["do_lower_case"]
        ml = d.get("model_max_length")
        if isinstance(ml, int) and not isinstance(ml, bool) and 0 < ml <= 1 << 20:
            kw["max_length"] = ml
        if max_length is not None:
            kw["max_length"] = max_length
        return cls(sp, path, special=st, added=read_added_tokens(os.fspath(model_dir), st), **kw)

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
                out.append(part)  # a special (or added) token written in the text
            elif part:
                out.extend(self._pieces(part))
        if len(out) > 1 and out[0] == SPIECE_UNDERLINE and out[1] in self.special:
            out = out[1:]
        return out

    def _text_ids(self, text) -> list[int]:
        return [self._matched[p] if p in self._matched else self.sp.piece_to_id(p) for p in self.tokenize(text)]

    def encode(self, text) -> list[int]:
        """Ids with "</s>" appended (unless already last), neither truncated nor padded."""
        ids = self._text_ids(text)
        return ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id]

    def __call__(self, texts, max_length: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
        """(input_ids, attention_mask), each [len(texts)][max_length]: truncated, "</s>"-ended, padded."""
        L = self.max_length if max_length is None else int(max_length)
        if isinstance(texts, (str, bytes)):
            texts = [texts]
        ids, mask = [], []
        for t in texts:
            row = self._text_ids(t)
            if len(row) + 1 > L:  # HF keeps room for the one "</s>" it adds: the text's first L - 1 ids...
                row = row[: L - 1]
            if not row or row[-1] != self.eos_id:  # ...then "</s>", unless they already end in one
                row = row + [self.eos_id]
            ids.append(row + [self.pad_id] * (L - len(row)))
            mask.append([1] * len(row) + [0] * (L - len(row)))
        return ids, mask
