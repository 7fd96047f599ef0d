"""Small JSON files of a model folder (config.json, preprocessor_config.json, tokenizer_config.json).

One reader for all of them, so each refuses the same things with the same one-line messages:
unreadable, too large, not UTF-8, not JSON (100k nested brackets and 5000-digit numbers included),
or not a JSON object.
"""

from __future__ import annotations

import json


def read_json_object(path: str, error: type, limit: int = 16 << 20) -> dict:
    """The JSON object in `path`, or `error` with one line naming the file and what is wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) > limit:
        raise error(f"{path}: larger than {limit >> 20} MiB, not a configuration file")
    try:
        d = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (ValueError, RecursionError) as e:  # a 5000-digit number, 100k nested brackets
        raise error(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d
