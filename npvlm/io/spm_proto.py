"""A quick look inside a SentencePiece ModelProto before handing it to the sentencepiece library.

sentencepiece aborts the process (or reads garbage) on some malformed files; walking the protobuf's
top-level fields first lets a broken tokenizer.model be refused with one line instead.
"""

from __future__ import annotations

import re


def modelproto_problem(data: bytes) -> str | None:
    """Why `data` is not a SentencePiece ModelProto (None if its top-level records look right).

    A ModelProto is a protobuf of length-delimited fields 1 (pieces), 2 (trainer_spec),
    3 (normalizer_spec), 4 (self_test_data), 5 (denormalizer_spec), written in that order.
    """
    if data[:1] == b"{":
        return "this is JSON (a tokenizer.json renamed?), not a SentencePiece model"
    head = data[:64]
    if re.match(rb"^[A-Za-z0-9+/=]+ \d+\r?\n", head):
        return "this is a tiktoken-style BPE file (lines of 'base64 rank', e.g. Llama 3), not a SentencePiece model"
    pos, n, seen = 0, len(data), set()
    while pos < n:
        start = pos
        tag, pos = _varint(data, pos)
        if tag is None:
            return f"truncated file ({n} bytes): a record header at byte {start} is cut off"
        field, wire = tag >> 3, tag & 7
        if wire != 2 or not 1 <= field <= 5:
            if start == 0:
                return "not a SentencePiece model (its first bytes are not a ModelProto record)"
            return f"not a SentencePiece model, or corrupt: unexpected record (field {field}, wire type {wire}) at byte {start}"
        length, pos = _varint(data, pos)
        if length is None or pos + length > n:
            return f"truncated file ({n} bytes): the record at byte {start} runs past the end"
        pos += length
        seen.add(field)
    if 1 not in seen:
        return "not a SentencePiece model (no pieces)"
    if 3 not in seen:
        return f"truncated file ({n} bytes): it ends before the normalizer_spec record"
    return None


def _varint(data: bytes, pos: int):
    value, shift = 0, 0
    while pos < len(data) and shift < 64:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    return None, pos


def user_defined_ids(data: bytes) -> frozenset:
    """Ids of the USER_DEFINED pieces (type 4: "<loc0000>", "\\n", ...) of a ModelProto that passed
    `modelproto_problem`. HF's converter makes these (and the CONTROL ones) added tokens, which keep their own
    flags when a file lists them again as extra special tokens; the sentencepiece library does not expose the type."""
    out, pos, k, n = set(), 0, 0, len(data)
    while pos < n:
        tag, pos = _varint(data, pos)
        length, pos = _varint(data, pos)
        if tag is None or length is None:
            break
        if tag >> 3 == 1:  # one SentencePiece {piece = 1; score = 2; type = 3}
            end, p = pos + length, pos
            while p < end:
                t, p = _varint(data, p)
                if t is None:
                    break
                if t & 7 == 0:
                    v, p = _varint(data, p)
                    if t >> 3 == 3 and v == 4:
                        out.add(k)
                elif t & 7 == 2:
                    ln, p = _varint(data, p)
                    p += ln or 0
                elif t & 7 == 5:
                    p += 4
                else:
                    break
            k += 1
        pos += length
    return frozenset(out)
