"""Which tokens a model folder makes special, read as transformers 5.24's `from_pretrained` reads them
(tokenization_utils_base.py `_from_pretrained` and `__init__`), for both tokenizers (tokenizer.py, siglip_tokenizer.py).

    tokenizer_config.json     bos / eos / unk / sep / pad / cls / mask_token; other `*_token` keys (HF calls them
                              model-specific special tokens); extra_special_tokens, or additional_special_tokens
                              when that is empty or absent
    special_tokens_map.json   read only when tokenizer_config.json has no `added_tokens_decoder` key (HF's legacy
                              branch: folders saved before transformers 4.34, or written by hand). Each of its keys
                              then replaces tokenizer_config.json's, except that its extra_special_tokens are appended
                              to the config's and a model-specific `*_token` of the config beats the map's.
    the class's defaults      for a named token that neither file sets (GemmaTokenizer: <bos> <eos> <unk> <pad>
                              <mask>; SiglipTokenizer: </s> <unk> </s>); `null` in a file unsets it instead.

A value is a token string or an AddedToken object ({"content": "<eos>", "special": true, ...}); its flags are
not used, as HF makes every one of these tokens special (matched whole in text, dropped by
decode(skip_special_tokens=True)). Two HF quirks of reading a SentencePiece tokenizer.model (no tokenizer.json
beside it) are kept: its converter passes the model's CONTROL and USER_DEFINED pieces as `additional_special_tokens`,
so the map's list of that name is lost there (its `extra_special_tokens` is not), and when a file does give
extra_special_tokens those win and the pieces are not added tokens at all (a control piece such as <eos> is then
special only if it is named). Anything else (a number, a list where a token belongs, a dict
without a string "content", an empty name) is one TokenizerError naming the file and the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import TokenizerError, show
from .files import read_json_object
from .memory import MAX_ADDED_TOKENS

NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")  # HF's order
EXTRA = "extra_special_tokens"
LEGACY_EXTRA = "additional_special_tokens"


@dataclass
class SpecialTokens:
    """The special tokens of a folder. `named` is in the order HF adds them (a token that is not in the
    vocabulary gets the next new id in this order, the extra ones after): NAMED, then the model-specific ones."""

    named: dict = field(default_factory=dict)      # "eos_token" -> "<eos>"
    defaults: frozenset = frozenset()               # keys of `named` that no file set (the class's defaults)
    extra: list = field(default_factory=list)       # ["<image>", ...]
    source: dict = field(default_factory=dict)      # key -> the file that set it, for messages
    settings: dict = field(default_factory=dict)    # every key after the merge (model_max_length, do_lower_case, ...)
    config: dict = field(default_factory=dict)      # tokenizer_config.json as read ({} if absent)
    spm_pieces_added: bool = True                   # False: HF drops its converter's list (module docstring)

    def from_files(self) -> dict:
        """The named tokens a file set (HF's added_tokens.json reading counts only these as special)."""
        return {k: v for k, v in self.named.items() if k not in self.defaults}

    def where(self, key: str) -> str:
        return f"{self.source.get(key, 'the tokenizer class default')} ({key})"


def read_special_tokens(model_dir: str, defaults: dict, sentencepiece_only: bool) -> SpecialTokens:
    """The special tokens `model_dir`'s tokenizer_config.json and special_tokens_map.json name (module docstring).

    `defaults`: the tokenizer class's named tokens; `sentencepiece_only`: HF reads a tokenizer.model here (so the
    map's additional_special_tokens are lost, as in HF)."""
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    map_path = os.path.join(model_dir, "special_tokens_map.json")
    config = read_json_object(cfg_path, TokenizerError, limit=16 << 20) if os.path.exists(cfg_path) else {}
    smap = {}
    if "added_tokens_decoder" not in config and os.path.exists(map_path):
        smap = read_json_object(map_path, TokenizerError, limit=16 << 20)
    kw, source, specific = _merge(config, cfg_path, smap, map_path)
    if sentencepiece_only:
        kw.pop(LEGACY_EXTRA, None)
    out = SpecialTokens(settings=kw, source=source, config=config, spm_pieces_added=not (sentencepiece_only and EXTRA in kw))
    for key in NAMED:
        if key in kw:
            token = _token(kw[key], source[key], key)
            if token is not None:
                out.named[key] = token
        elif key in defaults:
            out.named[key] = defaults[key]
    out.defaults = frozenset(k for k in out.named if k not in kw)
    for key, (value, path) in specific.items():
        token = _token(value, path, key)
        if token is not None:
            out.named[key] = token
            out.source[key] = path
    key = EXTRA if EXTRA in kw else LEGACY_EXTRA  # HF's __init__: the old name only when the new one is absent
    if kw.get(key) is not None:
        path = out.source[key]
        if not isinstance(kw[key], (list, tuple)):
            raise TokenizerError(f"{path}: {key} must be a list of tokens, got {show(kw[key])}")
        for i, v in enumerate(_bounded(kw[key], path, key)):
            token = _token(v, path, f"{key}[{i}]", empty_ok=True)
            if token and token not in out.extra:  # HF skips an empty one
                out.extra.append(token)
        out.source[EXTRA] = path
    return out


def _merge(config: dict, cfg_path: str, smap: dict, map_path: str):
    """HF's `_from_pretrained` merge: (the keys after it, key -> file, model-specific key -> (value, file))."""
    kw, source = dict(config), dict.fromkeys(config, cfg_path)
    if LEGACY_EXTRA in kw and not kw.get(EXTRA):  # HF renames the config's list before anything else
        kw[EXTRA] = kw.pop(LEGACY_EXTRA)
        source[EXTRA] = cfg_path
    explicit = {k: (kw.pop(k), cfg_path) for k in list(kw) if _model_specific(k) and isinstance(kw[k], str)}
    explicit.update(_specific_dict(kw, cfg_path))
    for key, value in smap.items():
        if key == EXTRA and isinstance(value, list):  # appended to the config's, duplicates dropped
            have = list(kw.get(EXTRA) or [])
            new = [_token(v, map_path, f"{key}[{i}]", empty_ok=True) for i, v in enumerate(_bounded(value, map_path, key))]
            value = have + [t for t in new if t not in have]
        kw[key], source[key] = value, map_path
    explicit.update(_specific_dict(kw, map_path))
    # HF's __init__ then takes the other `*_token` strings (and AddedToken objects) as model-specific too
    auto = {k: (v, source[k]) for k, v in kw.items() if _model_specific(k) and (
        isinstance(v, str) or isinstance(v, dict) and (source[k] == map_path or "__type" in v))}
    specific = {**auto, **explicit}  # HF's order: so the config's wins, and goes last
    if len(specific) > MAX_ADDED_TOKENS:
        raise TokenizerError(f"{cfg_path}: names {len(specific)} special tokens, more than npvlm supports ({MAX_ADDED_TOKENS})")
    return kw, source, specific


def _specific_dict(kw: dict, path: str) -> dict:
    """extra_special_tokens given as a dict (name -> token): model-specific tokens, taken out of `kw` as HF does."""
    if not isinstance(kw.get(EXTRA), dict):
        return {}
    return {k: (v, path) for k, v in _bounded(kw.pop(EXTRA), path, EXTRA).items()}


def read_added_tokens(model_dir: str, st: SpecialTokens) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) of the added tokens HF reads beside the model: tokenizer_config.json's
    added_tokens_decoder, else (HF's legacy branch, like special_tokens_map.json) added_tokens.json, whose tokens
    are special when a file names them."""
    path = os.path.join(model_dir, "tokenizer_config.json")
    table = st.config.get("added_tokens_decoder")
    if "added_tokens_decoder" not in st.config:
        path = os.path.join(model_dir, "added_tokens.json")
        if not os.path.exists(path):
            return {}
        table = read_json_object(path, TokenizerError, limit=16 << 20)
    table = table or {}
    if hasattr(table, "__len__") and len(table) > MAX_ADDED_TOKENS:  # counted before anything is built from it
        raise TokenizerError(f"{path}: lists {len(table)} added tokens, more than npvlm supports ({MAX_ADDED_TOKENS})")
    named = set(st.from_files().values()) | set(st.extra)
    try:
        if path.endswith("added_tokens.json"):
            return {int(i): (str(t), t in named) for t, i in table.items()}
        return {int(i): (str(v["content"]), bool(v.get("special", False))) for i, v in table.items()}
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise TokenizerError(f"{path}: malformed added tokens ({e!r})") from None


def _model_specific(key) -> bool:
    return key not in NAMED and key.endswith("_token")


def _bounded(values, path: str, key: str):
    if len(values) > MAX_ADDED_TOKENS:  # counted before anything is built from it
        raise TokenizerError(f"{path}: {key} lists {len(values)} tokens, more than npvlm supports ({MAX_ADDED_TOKENS})")
    return values


def _token(value, path: str, key: str, empty_ok: bool = False) -> "str | None":
    """The token a file names under `key`: a string, or an AddedToken object's "content"; None for null."""
    if value is None:
        return None
    content = value.get("content") if isinstance(value, dict) else value
    if not isinstance(content, str):
        raise TokenizerError(f"{path}: {key} must be a token string or an AddedToken object with a string "
                             f"\"content\", got {show(value)}")
    if not content and not empty_ok:
        raise TokenizerError(f"{path}: {key} is an empty string, not a token")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:
        raise TokenizerError(f"{path}: {key} {show(content)} is not valid Unicode (a lone surrogate)") from None
    return content


def appended_note(tok) -> str:
    """Why a tokenizer outgrew its model's embedding: the special tokens its files name that HF appends as new ids
    (`tok.appended`), for the end of that one-line error."""
    if not getattr(tok, "appended", None):
        return ""
    where, token, i = tok.appended[0]
    more = f" (and {len(tok.appended) - 1} more)" if len(tok.appended) > 1 else ""
    return f": {where} names {show(token)}, which is not in the vocabulary, so it gets the new id {i}, as in HF{more}"
