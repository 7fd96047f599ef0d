"""Train a small SentencePiece tokenizer that carries PaliGemma's special tokens.

Used by the tests (tiny checkpoints need a tokenizer) and by tools/train_shapes.py. It follows the
Gemma recipe so that HF's GemmaTokenizer and npvlm read the same ids:
    <pad>=0 <eos>=1 <bos>=2 <unk>=3, then "\n", "<image>", <loc0000>..<loc1023>, <seg000>..<seg127>
as user-defined symbols (always single pieces), BPE with byte fallback, no normalisation.

    python tools/make_tokenizer.py OUT_DIR [--vocab-size 1500] [--text corpus.txt]
"""

from __future__ import annotations

import argparse
import io
import os

SPECIAL = ["\n", "<image>"] + [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]

DEFAULT_WORDS = (
    "caption en answer detect segment describe ocr question the a an of in on left right above below "
    "red green blue yellow black white orange purple gray circle square triangle star shape shapes "
    "how many what color is are there where cat dog car tree house sky beach cow standing picture photo "
    "one two three four five zero and with near big small large tiny 0 1 2 3 4 5 6 7 8 9 , . ? ! ; : - ' "
)


def train_tokenizer(out_dir: str, lines: "list[str] | None" = None, vocab_size: int = 1500, seed: int = 0) -> str:
    """Write `out_dir/tokenizer.model` trained on `lines` (a default word list if None); return its path."""
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    if lines is None:
        words = DEFAULT_WORDS.split()
        lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=SPECIAL,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--vocab-size", type=int, default=1500)
    ap.add_argument("--text", help="a text file, one training sentence per line")
    a = ap.parse_args()
    lines = open(a.text, encoding="utf-8").read().splitlines() if a.text else None
    print(train_tokenizer(a.out_dir, lines, a.vocab_size))


if __name__ == "__main__":
    main()
