"""Write a random-weight PaliGemma checkpoint in HF format: config.json, safetensors, preprocessor config, tokenizer.

For tests and benchmarks: no hub, no network. The weights are drawn with NumPy a block of rows at a
time (BLOCK_VALUES) and streamed to disk, so no tensor is ever whole in memory: the real PaliGemma 2
10B shapes (`--preset pg2-10b-224 --dtype bfloat16 --shards 5 --tokenizer`, 19.3 GB) are written by a
process whose peak RSS stays a few hundred MB (transformers, imported for config.json, is most of it). transformers is used for config.json (so it
is exactly what `save_pretrained` writes) and, with a tokenizer, for the tokenizer / processor files.

Weights have spread (TESTING-NOTES.md): linear weights ~ N(0, (0.2 / sqrt(fan_in / 64))^2), so logits
are not flat; LayerNorm weights 1 + N(0, 0.1^2), Gemma RMSNorm weights N(0, 0.1^2) (applied as 1 + w),
biases N(0, 0.05^2). Each tensor's values depend only on (seed, hub name): every layout, dtype-free
comparison and sharding of one seed holds the same numbers.

Layouts (key naming on disk):
    hub           vision_tower.vision_model.*, language_model.model.*, multi_modal_projector.* (no lm_head)
    hub_lm_head   the same plus language_model.lm_head.weight (a copy of embed_tokens)
    v5            what transformers 5.24 save_pretrained writes: vision_tower.* without vision_model.
    v5_memory     transformers 4.52-5.5 in-memory names: model.language_model.*,
                  model.vision_tower.vision_model.*, model.multi_modal_projector.*, lm_head.weight
    v5_memory_flat transformers 5.24 in-memory names: as v5_memory with model.vision_tower.* flat

    python tools/make_checkpoint.py OUT_DIR --preset tiny [--dtype bfloat16] [--layout v5] [--shards 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import struct
import sys
import zlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Every size of the model; the defaults are the `tiny` preset (about 15K parameters)."""

    vision_hidden: int = 16  # Dv
    vision_intermediate: int = 32  # Fv
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 16  # S
    patch_size: int = 8  # P: (16 / 8)^2 = 4 image tokens
    model_type: str = "gemma"  # or "gemma2"
    vocab: int = 128  # V
    hidden: int = 16  # D
    intermediate: int = 32  # F
    layers: int = 2
    heads: int = 2  # H
    kv_heads: int = 1  # K
    head_dim: int = 8  # E
    # Gemma 2 only; None picks the PaliGemma 2 values (query_pre_attn_scalar = head_dim, 50, 30, 4096)
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None


_PG_VISION = dict(vision_hidden=1152, vision_intermediate=4304, vision_layers=27, vision_heads=16, patch_size=14)
PRESETS = {
    "tiny": {},
    "tiny-tok": dict(vocab=1536),  # room for the test tokenizer (1500 pieces)
    "tiny-gemma2": dict(model_type="gemma2", vocab=128, heads=4, kv_heads=2, query_pre_attn_scalar=8, sliding_window=4),
    "pg1-3b-224": dict(_PG_VISION, image_size=224, model_type="gemma", vocab=257216, hidden=2048, intermediate=16384,
                       layers=18, heads=8, kv_heads=1, head_dim=256),
    "pg2-3b-448": dict(_PG_VISION, image_size=448, model_type="gemma2", vocab=257216, hidden=2304, intermediate=9216,
                       layers=26, heads=8, kv_heads=4, head_dim=256, query_pre_attn_scalar=256,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096),
    # google/paligemma2-10b-pt-224: Gemma 2 9B (SPEC.md's table) + SigLIP So400m at 224 px, 9.66 B parameters
    # (19.3 GB in bf16, 38.7 GB in float32): write it with --dtype bfloat16 --shards 5 --tokenizer
    "pg2-10b-224": dict(_PG_VISION, image_size=224, model_type="gemma2", vocab=257216, hidden=3584, intermediate=14336,
                        layers=42, heads=16, kv_heads=8, head_dim=256, query_pre_attn_scalar=256,
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096),
}
LAYOUTS = ("hub", "hub_lm_head", "v5", "v5_memory", "v5_memory_flat")
DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}
REAL_IMAGE_TOKEN = 257152  # "<image>" in the real PaliGemma vocabulary
TOKENIZER_PIECES = 1500  # the test tokenizer's size (tools/make_tokenizer.py)


def shapes_for(preset: str = "tiny", **overrides) -> Shapes:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    s = Shapes(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})
    if s.model_type == "gemma2":
        s = dataclasses.replace(
            s,
            query_pre_attn_scalar=s.query_pre_attn_scalar or s.head_dim,
            attn_logit_softcapping=s.attn_logit_softcapping or 50.0,
            final_logit_softcapping=s.final_logit_softcapping or 30.0,
            sliding_window=s.sliding_window or 4096,
        )
    return s


# ---------------------------------------------------------------------------------------------
# Tensors: names (hub layout), shapes, values


def tensor_plan(s: Shapes) -> list[tuple[str, tuple[int, ...]]]:
    """Every weight of the model as (hub name, shape), lm_head excluded."""
    Dv, Fv, P, N = s.vision_hidden, s.vision_intermediate, s.patch_size, (s.image_size // s.patch_size) ** 2
    v = "vision_tower.vision_model."
    plan = [(v + "embeddings.patch_embedding.weight", (Dv, 3, P, P)), (v + "embeddings.patch_embedding.bias", (Dv,)),
            (v + "embeddings.position_embedding.weight", (N, Dv))]
    for i in range(s.vision_layers):
        p = f"{v}encoder.layers.{i}."
        plan += [(p + n + "." + w, (Dv,)) for n in ("layer_norm1", "layer_norm2") for w in ("weight", "bias")]
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            plan += [(f"{p}self_attn.{proj}.weight", (Dv, Dv)), (f"{p}self_attn.{proj}.bias", (Dv,))]
        plan += [(p + "mlp.fc1.weight", (Fv, Dv)), (p + "mlp.fc1.bias", (Fv,)),
                 (p + "mlp.fc2.weight", (Dv, Fv)), (p + "mlp.fc2.bias", (Dv,))]
    plan += [(v + "post_layernorm.weight", (Dv,)), (v + "post_layernorm.bias", (Dv,)),
             ("multi_modal_projector.linear.weight", (s.hidden, Dv)), ("multi_modal_projector.linear.bias", (s.hidden,))]
    return plan + _text_plan(s)


def _text_plan(s: Shapes) -> list[tuple[str, tuple[int, ...]]]:
    D, F, HE, KE = s.hidden, s.intermediate, s.heads * s.head_dim, s.kv_heads * s.head_dim
    norms = ["input_layernorm", "post_attention_layernorm"]
    if s.model_type == "gemma2":
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    plan = [("language_model.model.embed_tokens.weight", (s.vocab, D))]
    for j in range(s.layers):
        p = f"language_model.model.layers.{j}."
        plan += [(f"{p}{n}.weight", (D,)) for n in norms]
        plan += [(p + "self_attn.q_proj.weight", (HE, D)), (p + "self_attn.k_proj.weight", (KE, D)),
                 (p + "self_attn.v_proj.weight", (KE, D)), (p + "self_attn.o_proj.weight", (D, HE)),
                 (p + "mlp.gate_proj.weight", (F, D)), (p + "mlp.up_proj.weight", (F, D)),
                 (p + "mlp.down_proj.weight", (D, F))]
    return plan + [("language_model.model.norm.weight", (D,))]


BLOCK_VALUES = 1 << 23  # values drawn, encoded and written at a time (32 MiB of float32): the writer's footprint


def random_blocks(name: str, shape: tuple[int, ...], seed: int, block: int = BLOCK_VALUES):
    """float32 values for one hub-named weight, C order, in blocks of whole rows (at most `block` values, or one
    row); they depend only on (seed, name), not on the blocking: one generator draws them in sequence."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    rows, row = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    step = max(1, block // max(1, row))
    for a in range(0, rows, step):
        x = rng.standard_normal((min(step, rows - a),) + tuple(shape[1:]), dtype=np.float32)
        if "norm" in name.rsplit(".", 2)[-2]:  # layer_norm1, post_layernorm, input_layernorm, norm, ...
            if name.startswith("language_model."):
                x *= 0.1  # Gemma RMSNorm: applied as (1 + w), neutral at 0
            elif name.endswith(".weight"):
                x = 1.0 + 0.1 * x  # LayerNorm scale, neutral at 1
            else:
                x *= 0.05
        elif name.endswith(".bias"):
            x *= 0.05
        else:
            x *= 0.2 / math.sqrt(math.prod(shape[1:]) / 64)  # fan_in: all but the output axis
        yield x


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """float32 values for one hub-named weight, whole; they depend only on (seed, name)."""
    return np.concatenate(list(random_blocks(name, shape, seed))).reshape(shape)


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the on-disk little-endian bytes of `dtype` (bfloat16: round to nearest even)."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float16":
        return x.astype("<f2")
    if dtype == "bfloat16":  # in chunks: the 2 GB embedding of the real model needs no 8 GB of temporaries
        src, out = x.reshape(-1).view(np.uint32), np.empty(x.size, "<u2")
        for i in range(0, x.size, 1 << 24):
            u = src[i : i + (1 << 24)]
            out[i : i + (1 << 24)] = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # finite values only
        return out.reshape(x.shape)
    return x.astype("<f4", copy=False)


# ---------------------------------------------------------------------------------------------
# Layouts and files


def layout_name(hub: str, layout: str) -> str:
    """The on-disk name of a hub-named weight in `layout`."""
    if layout in ("hub", "hub_lm_head"):
        return hub
    flat = hub.replace("vision_tower.vision_model.", "vision_tower.", 1)
    if layout == "v5":
        return flat
    name = flat if layout == "v5_memory_flat" else hub
    if name == "language_model.lm_head.weight":
        return "lm_head.weight"
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model.") :]
    return "model." + name


def _split(plan, shards: int, itemsize: int) -> list[list]:
    """Contiguous groups of roughly equal bytes, none empty."""
    if not 1 <= shards <= len(plan):
        raise ValueError(f"shards must be between 1 and {len(plan)}, got {shards}")
    total = max(1, sum(math.prod(shape) * itemsize for _, shape in plan))
    groups, acc, k = [[] for _ in range(shards)], 0, 0
    for i, (name, shape) in enumerate(plan):
        k = max(k, min(acc * shards // total, k + 1))  # move on by at most one shard at a time
        k = max(k, shards - (len(plan) - i))  # leave a tensor for each later shard
        groups[k].append((name, shape))
        acc += math.prod(shape) * itemsize
    return groups


def write_safetensors(path: str, tensors: list[tuple[str, tuple[int, ...]]], st_dtype: str, itemsize: int, produce) -> int:
    """Stream tensors to `path`: produce(name) yields each one's bytes in C order (arrays, a block of rows at a time:
    no tensor is ever whole in memory); return the file size. produce=None: the header only, the file extended to
    its full size (zeros, sparse on disk)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = math.prod(shape) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as the reference writer does
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        if produce is None:
            f.truncate(8 + len(raw) + offset)
            tensors = []
        for name, shape in tensors:
            n = 0
            for data in produce(name):
                data = np.ascontiguousarray(data)
                f.write(memoryview(data).cast("B"))
                n += data.nbytes
            assert n == math.prod(shape) * itemsize, name
    os.replace(path + ".tmp", path)
    return 8 + len(raw) + offset


def write_weights(out_dir: str, s: Shapes, *, dtype="float32", layout="hub", shards=1, seed=0, sparse=False) -> list[str]:
    """The safetensors file(s) (and index) of a random model; returns the files written. `sparse`: headers only, each
    file its full size but all zeros and sparse on disk (for what happens before a weight is read: memory checks)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    st_dtype, itemsize = DTYPES[dtype]
    plan = tensor_plan(s)
    if layout in ("hub_lm_head", "v5_memory", "v5_memory_flat"):
        plan.append(("language_model.lm_head.weight", (s.vocab, s.hidden)))
    hub_of, shape_of = {layout_name(h, layout): h for h, _ in plan}, dict(plan)

    def produce(name):
        hub = hub_of[name]
        if hub == "language_model.lm_head.weight":  # tied: the embedding's values
            hub = "language_model.model.embed_tokens.weight"
        return (_encode(x, dtype) for x in random_blocks(hub, shape_of[hub], seed))

    source = None if sparse else produce
    groups = _split([(layout_name(h, layout), shape) for h, shape in plan], shards, itemsize)
    _clear_weights(out_dir)
    if shards == 1:
        path = os.path.join(out_dir, "model.safetensors")
        write_safetensors(path, groups[0], st_dtype, itemsize, source)
        return [path]
    return _write_shards(out_dir, groups, st_dtype, itemsize, source)


def _write_shards(out_dir, groups, st_dtype, itemsize, produce) -> list[str]:
    paths, weight_map, total = [], {}, 0
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(os.path.join(out_dir, fname), group, st_dtype, itemsize, produce)
        paths.append(os.path.join(out_dir, fname))
        weight_map.update({name: fname for name, _ in group})
        total += sum(math.prod(shape) * itemsize for _, shape in group)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)
    return paths + [os.path.join(out_dir, "model.safetensors.index.json")]


def _clear_weights(out_dir: str) -> None:
    """Remove the weights of an earlier run, so that a single file and an index never coexist."""
    for name in os.listdir(out_dir):
        if name.startswith("model") and (name.endswith(".safetensors") or name == "model.safetensors.index.json"):
            os.remove(os.path.join(out_dir, name))


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# config.json, preprocessor_config.json, tokenizer


def hf_config(s: Shapes, image_token_index: int, dtype: str = "float32"):
    """A transformers PaliGemmaConfig for these shapes (vision pooling head off, as in PaliGemma)."""
    from transformers import PaliGemmaConfig

    text = dict(model_type=s.model_type, vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                head_dim=s.head_dim)
    if s.model_type == "gemma2":
        text.update(query_pre_attn_scalar=s.query_pre_attn_scalar, attn_logit_softcapping=s.attn_logit_softcapping,
                    final_logit_softcapping=s.final_logit_softcapping, sliding_window=s.sliding_window)
    vision = dict(hidden_size=s.vision_hidden, intermediate_size=s.vision_intermediate, num_hidden_layers=s.vision_layers,
                  num_attention_heads=s.vision_heads, image_size=s.image_size, patch_size=s.patch_size,
                  projection_dim=s.hidden, vision_use_head=False)
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=image_token_index,
                          projection_dim=s.hidden, hidden_size=s.hidden, vocab_size=s.vocab)
    cfg.text_config.num_image_tokens = (s.image_size // s.patch_size) ** 2
    cfg.architectures = ["PaliGemmaForConditionalGeneration"]
    cfg.dtype = dtype
    return cfg


def _preprocessor_config(s: Shapes) -> dict:
    """The hub's preprocessor_config.json for PaliGemma (SigLIP: resize, x/255, (x - 0.5) / 0.5)."""
    return {
        "do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
        "image_seq_length": (s.image_size // s.patch_size) ** 2, "image_std": [0.5, 0.5, 0.5],
        "processor_class": "PaliGemmaProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"height": s.image_size, "width": s.image_size},
    }


def write_tokenizer(out_dir: str, vocab: int) -> int:
    """tokenizer.model (+ HF's tokenizer.json / tokenizer_config.json); returns the id of "<image>"."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        try:
            from tools.make_tokenizer import train_tokenizer  # imported from the repository root (tests)
        except ImportError:
            from make_tokenizer import train_tokenizer  # run as a script: tools/ is on sys.path
    finally:
        sys.path.pop(0)
    import sentencepiece as spm

    path = train_tokenizer(out_dir, vocab_size=min(vocab, TOKENIZER_PIECES))
    sp = spm.SentencePieceProcessor(model_file=path)
    if sp.get_piece_size() > vocab:
        raise ValueError(f"the tokenizer has {sp.get_piece_size()} pieces, more than vocab_size {vocab}")
    ids = [sp.piece_to_id(p) for p in ("<pad>", "<eos>", "<bos>")]
    assert ids == [0, 1, 2], f"tokenizer special ids {ids} do not match config.json's pad/eos/bos 0/1/2"
    _write_hf_tokenizer_files(out_dir)
    return sp.piece_to_id("<image>")


def _write_hf_tokenizer_files(out_dir: str) -> None:
    """What the hub ships beside tokenizer.model, so HF's PaliGemmaProcessor.from_pretrained(dir) works."""
    from transformers import GemmaTokenizer

    tok = GemmaTokenizer.from_pretrained(out_dir, mask_token=None)  # no extra "<mask>" id past the vocab
    tok.save_pretrained(out_dir)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    for junk in ("vocab_file", "is_local", "local_files_only", "name_or_path"):  # absolute paths, load-time state
        cfg.pop(junk, None)
    cfg.update(processor_class="PaliGemmaProcessor", add_bos_token=True, add_eos_token=False)
    _write_json(cfg_path, cfg)
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
               "additional_special_tokens": ["<image>"]}
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)


def make_checkpoint(out_dir: str, preset: str = "tiny", *, dtype: str = "float32", layout: str = "hub",
                    shards: int = 1, seed: int = 0, image_token_index: int | None = None,
                    tokenizer: bool | None = None, sparse: bool = False, **shape_overrides) -> str:
    """Write a random PaliGemma checkpoint folder and return its path.

    `shape_overrides` are fields of `Shapes` (vocab=..., hidden=..., model_type="gemma2", ...).
    `tokenizer`: None writes one when the vocabulary has room for the 1500-piece test tokenizer and is
    not the real 257216 (then "<image>" is its id, 5); True insists; False never. Without a tokenizer,
    image_token_index defaults to 257152 for a real-sized vocabulary and 5 otherwise.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    s = shapes_for(preset, **shape_overrides)
    os.makedirs(out_dir, exist_ok=True)
    if tokenizer is None:
        tokenizer = TOKENIZER_PIECES <= s.vocab <= 65536
    if tokenizer:
        image_id = write_tokenizer(out_dir, s.vocab)
        if image_token_index is not None and image_token_index != image_id:
            raise ValueError(f"image_token_index {image_token_index} is not the tokenizer's <image> id {image_id}")
        image_token_index = image_id
    elif image_token_index is None:
        image_token_index = REAL_IMAGE_TOKEN if s.vocab > REAL_IMAGE_TOKEN else min(5, s.vocab - 1)
    hf_config(s, image_token_index, dtype).save_pretrained(out_dir)
    _write_json(os.path.join(out_dir, "preprocessor_config.json"), _preprocessor_config(s))
    write_weights(out_dir, s, dtype=dtype, layout=layout, shards=shards, seed=seed, sparse=sparse)
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Shape flags override the preset.")
    ap.add_argument("out_dir")
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS))
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--layout", default="hub", choices=LAYOUTS)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-token-index", type=int)
    ap.add_argument("--sparse", action="store_true", help="headers only: full-size files of zeros, sparse on disk")
    ap.add_argument("--tokenizer", action=argparse.BooleanOptionalAction, default=None,
                    help="write the 1500-piece test tokenizer (default: when the vocabulary fits it)")
    for f in dataclasses.fields(Shapes):
        kind = str if f.name == "model_type" else float if "scal" in f.name or "capping" in f.name else int
        ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind,
                        choices=("gemma", "gemma2") if f.name == "model_type" else None)
    a = vars(ap.parse_args(argv))
    out = a.pop("out_dir")
    print(make_checkpoint(out, **a))


if __name__ == "__main__":
    main()
