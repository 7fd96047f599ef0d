"""Text in and out: PaliGemma's Gemma tokenizer, with the ids HF's `PaliGemmaProcessor` produces.

Two file formats, tried in this order (SPEC.md §8, FIELD-NOTES.md §3.3):
  tokenizer.model  a SentencePiece ModelProto (PaliGemma 1 repos, big_vision), read by `sentencepiece`;
  tokenizer.json   an HF `tokenizers` file (PaliGemma 2 repos ship only this), read by `tokenizers`.

What HF does on top of the raw model, and npvlm copies:
  * the special tokens: the named ones (bos / eos / unk / pad / mask ..., GemmaTokenizer's <bos> <eos> <unk>
    <pad> <mask> unless tokenizer_config.json or special_tokens_map.json rename them, with HF's precedence:
    npvlm/io/special_tokens.py), the extra ones those files list, control pieces, added tokens flagged special
    and "<image>" (the processor makes it special). A named or extra token the vocabulary lacks gets the next
    new id, as HF appends it (not the class's default <mask>: small tokenizers without one spell it out).
  * special tokens and other added tokens written in the text are matched first, leftmost-longest, and become
    single ids; SentencePiece alone would spell "<bos>" out as characters. "<locNNNN>"/"<segNNN>" and "\\n" are
    user-defined pieces in both.
  * `decode(skip_special_tokens=True)` drops the special tokens; "<locNNNN>"/"<segNNN>" stay as text. Runs
    of byte-fallback pieces that are not valid UTF-8 become one U+FFFD *per byte* (HF's ByteFallback),
    and ids outside the vocabulary are skipped, as HF does.
The prompt's layout ("<image>"*N <bos> prompt "\\n" [suffix <eos>]) is the model's business:
npvlm/models/paligemma_inputs.py.
"""

from __future__ import annotations

import os
import re
import warnings

from ..errors import TokenizerError
from .special_tokens import SpecialTokens, read_added_tokens, read_special_tokens
from .tokenizer_engines import _HFTokenizers, _SentencePiece

IMAGE_TOKEN = "<image>"
GEMMA_DEFAULTS = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
                  "mask_token": "<mask>"}  # GemmaTokenizer's named special tokens


class Tokenizer:
    """A loaded tokenizer; build it with `Tokenizer.from_dir(model_dir)`."""

    def __init__(self, backend, path: str, added: dict[int, tuple[str, bool]], image_token_id: int | None = None,
                 special: SpecialTokens | None = None):
        self._b = backend  # _SentencePiece or _HFTokenizers
        self.path = path
        special = special or SpecialTokens(dict(GEMMA_DEFAULTS), frozenset(GEMMA_DEFAULTS))
        # the pieces HF holds as added tokens (-> their special flag), and the ones it matches in text for the library
        own, own_split, own_special = backend.added_flags, backend.split_tokens, backend.special_ids
        if not special.spm_pieces_added and isinstance(backend, _SentencePiece):
            own, own_split, own_special = {}, {}, frozenset()
        self._own = own
        # added tokens (from tokenizer_config.json / added_tokens.json / the caller): id -> (text, special)
        self._added = dict(added)
        self._added_ids = {t: i for i, (t, _) in sorted(self._added.items(), reverse=True)}  # first id wins
        image_id = self.piece_to_id(IMAGE_TOKEN)
        if image_token_id is not None:
            image_token_id = int(image_token_id)
            if image_id is not None and image_id != image_token_id:
                raise TokenizerError(f"{path}: {IMAGE_TOKEN} is id {image_id} here but the model config says {image_token_id}")
            if image_id is None:
                if image_token_id < backend.size and backend.piece(image_token_id) is not None:
                    raise TokenizerError(f"{path}: image token id {image_token_id} is already the piece "
                                         f"{backend.piece(image_token_id)!r}, not {IMAGE_TOKEN}")
                self._added[image_token_id] = (IMAGE_TOKEN, True)
                self._added_ids[IMAGE_TOKEN] = image_token_id
                image_id = image_token_id
        self.image_id: int | None = image_id
        self.vocab_size: int = max([backend.size] + [i + 1 for i in self._added])
        self.appended: list[tuple[str, str, int]] = []  # (where, token, new id): named tokens HF appends
        named = self._special_tokens(special)
        self.bos_id = named.get("bos_token", backend.bos_id)
        self.eos_id = named.get("eos_token", backend.eos_id)
        if self.bos_id is None or self.eos_id is None:
            raise TokenizerError(f"{path}: no <bos>/<eos> token; not a Gemma/PaliGemma tokenizer")
        # what decode(skip_special_tokens=True) drops
        drop = set(own_special) | {i for i, (_, sp) in self._added.items() if sp}
        if image_id is not None:
            drop.add(image_id)
        self._special = frozenset(drop)
        # what encode matches in the raw text before the model sees it (HF's added-token split)
        # (a tokenizer.json's own added tokens are matched by the library, with their own flags)
        # (an empty one is matched nowhere, as HF ignores it: an empty alternative would split every character)
        split = {t: i for t, i in self._added_ids.items() if t and (backend.split_added or t not in own)}
        split.update(own_split)
        self._split_ids = split
        alts = sorted(split, key=len, reverse=True)  # longest first = leftmost-longest match
        self._split_re = re.compile("|".join(re.escape(t) for t in alts)) if alts else None

    def _special_tokens(self, st: SpecialTokens) -> dict[str, int]:
        """Make the named and extra special tokens special, appending the ones the vocabulary lacks as HF does
        (in its order: named, then extra); return the named ones' ids. An extra token that already is an added
        token (a user-defined piece such as "<loc0001>", an added_tokens_decoder entry) keeps its own flag."""
        ids = {}
        for key, token in list(st.named.items()) + [(None, t) for t in st.extra]:
            i = self.piece_to_id(token)
            if i is None and key in st.defaults:
                continue  # the class's default, absent here (<mask>): spelled out, not a new id
            if i is None:
                i = self.vocab_size
                self.vocab_size += 1
                self.appended.append((st.where(key or "extra_special_tokens"), token, i))
            elif key is None and (i in self._added or token in self._own):
                continue
            if key is not None:
                ids.setdefault(key, i)
            self._added[i] = (self._added[i][0] if i in self._added else token, True)  # an added token keeps its text
            self._added_ids.setdefault(token, i)
        return ids

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, model_dir, *, image_token_id: int | None = None) -> "Tokenizer":
        """Load `model_dir/tokenizer.model` (SentencePiece), else `model_dir/tokenizer.json` (HF tokenizers).

        `image_token_id` (the config's `image_token_index`) registers "<image>" when the tokenizer file
        lacks it (big_vision's tokenizer.model has no "<image>"; HF appends it at id 257152) and is
        checked against the file when it has one. The special tokens are tokenizer_config.json's and
        special_tokens_map.json's, with HF's precedence (npvlm/io/special_tokens.py).
        """
        model_dir = os.fspath(model_dir)
        if not os.path.isdir(model_dir):
            raise TokenizerError(f"{model_dir}: not a directory")
        sp_path = os.path.join(model_dir, "tokenizer.model")
        js_path = os.path.join(model_dir, "tokenizer.json")
        # HF reads tokenizer.json when there is one (npvlm prefers tokenizer.model: the same ids, no conversion)
        st = read_special_tokens(model_dir, GEMMA_DEFAULTS, sentencepiece_only=not os.path.isfile(js_path))
        added = read_added_tokens(model_dir, st)
        sp_error = None
        if os.path.isfile(sp_path):
            try:
                return cls(_SentencePiece.load(sp_path), sp_path, added, image_token_id, st)
            except TokenizerError as e:
                if not os.path.isfile(js_path):
                    raise
                sp_error = str(e)
        if os.path.isfile(js_path):
            try:
                tok = cls(_HFTokenizers.load(js_path), js_path, added, image_token_id, st)
            except TokenizerError as e:
                raise TokenizerError(f"{sp_error}; {e}" if sp_error else str(e)) from None
            if sp_error:
                warnings.warn(f"{sp_error}; using {js_path} instead", stacklevel=2)
            return tok
        raise TokenizerError(f"{model_dir}: no tokenizer found (looked for tokenizer.model and tokenizer.json)")

    # ---------------------------------------------------------------- vocabulary
    def id_to_piece(self, i) -> str:
        i = int(i)
        if i in self._added:
            return self._added[i][0]
        piece = self._b.piece(i) if 0 <= i < self._b.size else None
        if piece is None:
            raise TokenizerError(f"{self.path}: token id {i} is outside the vocabulary (size {self.vocab_size})")
        return piece

    def piece_to_id(self, piece: str) -> int | None:
        i = self._added_ids.get(piece)
        return i if i is not None else self._b.piece_id(piece)

    # ---------------------------------------------------------------- text <-> ids
    def encode(self, text) -> list[int]:
        """Token ids of `text`, without <bos>/<eos>; special tokens written in the text are single ids."""
        text = as_text(text, "text")
        if self._split_re is None:
            return self._b.encode(text)
        ids, pos = [], 0
        for m in self._split_re.finditer(text):
            if m.start() > pos:
                ids += self._b.encode(text[pos:m.start()])
            ids.append(self._split_ids[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self._b.encode(text[pos:])
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` as HF's `decode`: specials dropped (if asked), <loc>/<seg> kept, unknown ids skipped."""
        keep = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size or (skip_special_tokens and i in self._special):
                continue
            keep.append(i)
        return self._b.decode(keep, self._added)


def as_text(text, what: str) -> str:
    """str as is, UTF-8 bytes decoded; anything else, bad bytes or lone surrogates -> TokenizerError."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{what} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    if not isinstance(text, str):
        raise TokenizerError(f"{what} must be str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"{what} is not valid Unicode (lone surrogate U+{ord(text[e.start]):04X} at offset {e.start})") from None
    return text
