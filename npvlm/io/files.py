"""Reading the small files of a model folder, once, the same way everywhere.

    read_bytes(path, what, error)        the whole file, refusing git-LFS pointers, empty and huge files
    parse_json(raw, path, what, error)   strict JSON (UTF-8, no duplicate keys, no NaN) or one error line
    read_json_object(path, error)        config.json, preprocessor_config.json, tokenizer_config.json, ...
    check_numbers(d, keys, where, error) the numeric keys of an untrusted JSON object hold sane numbers

Every refusal is one line naming the file and what is wrong, raised as the caller's error type
(ConfigError for configs, TokenizerError for tokenizers, CheckpointError for safetensors headers).
"""

from __future__ import annotations

import json
import math
import os
import stat

from ..errors import show, show_path

LFS_MAGIC = b"version https://git-lfs.github.com/spec/"  # what `git clone` leaves without git-lfs


def lfs_pointer_message(what: str) -> str:
    return f"is a git-LFS pointer, not the {what}: run `git lfs pull` (install git-lfs) in the model folder"


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_regular(path, error: type) -> "os.stat_result | None":
    """os.stat(path) (through symlinks) for a regular file; anything else (a FIFO with no writer would block
    open() forever, /dev/zero never ends) is one `error` line. A missing file is left to open() to report."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a plain file")
        raise error(f"{show_path(path)}: is {kind}, not a regular file")
    return st


def read_bytes(path: str, what: str, error: type, limit: int = 1 << 30) -> bytes:
    """The bytes of `path`, or `error`: unreadable, over `limit`, empty, or a git-LFS pointer."""
    check_regular(path, error)
    try:
        size = os.path.getsize(path)
        if size > limit:
            raise error(f"{show_path(path)}: {size} bytes, too large for a {what}")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"{show_path(path)}: cannot read ({e.strerror or e})") from None
    if data.startswith(LFS_MAGIC):
        raise error(f"{show_path(path)}: {lfs_pointer_message(what)}")
    if not data:
        raise error(f"{show_path(path)}: empty file")
    return data


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise _Duplicate(k)
        d[k] = v
    return d


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes, path: str, what: str | None, error: type, *, strict: bool = True):
    """JSON from bytes; `strict` also refuses duplicate keys and NaN/Infinity (as safetensors does).
    Messages read `PATH: WHAT is not valid JSON (...)`, or `PATH: not valid JSON (...)` without `what`."""
    where = f"{show_path(path)}: {what} is" if what else f"{show_path(path)}:"  # "P: header is not ..." / "P: not ..."
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where} not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    hooks = dict(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant) if strict else {}
    try:
        return json.loads(text, **hooks)
    except _Duplicate as e:
        raise error(f"{where} JSON with the key {show(e.args[0], 80)} twice") from None
    except json.JSONDecodeError as e:
        raise error(f"{where} not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # NaN, 5000-digit ints, 100k nested brackets
        raise error(f"{where} not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None


def read_json_object(path: str, error: type, limit: int = 16 << 20) -> dict:
    """The JSON object in `path`, or `error` with one line naming the file and what is wrong."""
    check_regular(path, error)
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise error(f"{show_path(path)}: cannot read ({e.strerror or e})") from None
    if len(raw) > limit:
        raise error(f"{show_path(path)}: larger than {limit >> 20} MiB, not a configuration file")
    if raw.startswith(LFS_MAGIC):
        raise error(f"{show_path(path)}: {lfs_pointer_message('file')}")
    d = parse_json(raw, path, None, error, strict=False)
    if not isinstance(d, dict):
        raise error(f"{show_path(path)}: expected a JSON object, got {type(d).__name__}")
    return d


def bad_number(v, integer: bool) -> bool:
    """Not a JSON number (bools and strings are not), not finite, or (for an integer key) not a whole number."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return True
    if isinstance(v, int):  # no size or token id is near 2**63; a float() of over 1e308 overflows
        return abs(v) > (1 << 63 if integer else 1e308)
    return not math.isfinite(v) or (integer and not v.is_integer())


def check_numbers(d: dict, ints, floats, nullable, where: str, error: type, prefix: str = "") -> None:
    """Each key of `ints` / `floats` present in `d` holds an integer / a finite number (None allowed for
    keys in `nullable`, where HF reads null as "default" / "off"); the error names the key and the value."""
    for key in tuple(ints) + tuple(floats):
        if key not in d or (d[key] is None and key in nullable):
            continue
        integer = key in ints
        if bad_number(d[key], integer):
            kind = "an integer" if integer else "a finite number"
            raise error(f"{where}: {prefix}{key} must be {kind}, got {show(d[key])}")
