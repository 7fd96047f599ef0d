"""What a PaliGemma checkpoint holds: every tensor's canonical name and shape, from config.json.

Canonical names are the hub layout of google/paligemma-3b-pt-224 (SPEC.md §12):
`vision_tower.vision_model.*`, `multi_modal_projector.linear.*`, `language_model.model.*`.
Four other naming schemes in the wild (transformers 5 saves, in-memory names, a flat vision
tower, an explicit lm_head) are renamed to it; the SigLIP pooling head, which PaliGemma never
uses, is skipped. The generic reader (npvlm/io/checkpoint.py) takes the `Schema` built here.
"""

from __future__ import annotations

from ..io.checkpoint import Schema
from .paligemma_config import PaliGemmaConfig

LM_HEAD = "language_model.lm_head.weight"  # optional: tied to embed_tokens, dropped at load

# (prefix, replacement): transformers >= 4.52 in-memory names -> the hub's file names; first match wins
_RENAMES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)
_VISION = "vision_tower.vision_model."


def canonical_name(key: str, config: PaliGemmaConfig | None = None) -> str | None:
    """The hub name (vision_tower.vision_model.* / language_model.model.* / multi_modal_projector.*) of
    `key` in any supported scheme; None for a key to skip (the SigLIP pooling head, unless `config`
    says vision_use_head=false, in which case its keys come back named and are reported unexpected)."""
    for old, new in _RENAMES:
        if key.startswith(old):
            key = new + key[len(old) :]
            break
    if key.startswith("vision_tower.") and not key.startswith(_VISION):  # transformers 5 flat SigLIP
        key = _VISION + key[len("vision_tower.") :]
    if key.startswith(_VISION + "head.") and (config is None or config.vision.use_head):
        return None
    return key


def _vision_shapes(config: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    v = config.vision
    Dv, Fv, P = v.hidden_size, v.intermediate_size, v.patch_size
    s = {
        _VISION + "embeddings.patch_embedding.weight": (Dv, v.num_channels, P, P),
        _VISION + "embeddings.patch_embedding.bias": (Dv,),
        _VISION + "embeddings.position_embedding.weight": (v.num_patches, Dv),
    }
    for i in range(v.num_hidden_layers):
        p = f"{_VISION}encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            s[p + norm + ".weight"] = s[p + norm + ".bias"] = (Dv,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[f"{p}self_attn.{proj}.weight"], s[f"{p}self_attn.{proj}.bias"] = (Dv, Dv), (Dv,)
        s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = (Fv, Dv), (Fv,)
        s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = (Dv, Fv), (Dv,)
    s[_VISION + "post_layernorm.weight"] = s[_VISION + "post_layernorm.bias"] = (Dv,)
    return s


def _text_shapes(config: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    t = config.text
    D, F, H, K, E = t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
    norms = ["input_layernorm", "post_attention_layernorm"]
    if t.is_gemma2:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    s = {"language_model.model.embed_tokens.weight": (t.vocab_size, D)}
    for j in range(t.num_hidden_layers):
        p = f"language_model.model.layers.{j}."
        for norm in norms:
            s[f"{p}{norm}.weight"] = (D,)
        s[p + "self_attn.q_proj.weight"] = (H * E, D)
        s[p + "self_attn.k_proj.weight"] = s[p + "self_attn.v_proj.weight"] = (K * E, D)
        s[p + "self_attn.o_proj.weight"] = (D, H * E)
        s[p + "mlp.gate_proj.weight"] = s[p + "mlp.up_proj.weight"] = (F, D)
        s[p + "mlp.down_proj.weight"] = (D, F)
    s["language_model.model.norm.weight"] = (D,)
    return s


def expected_shapes(config: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every required weight (hub names) and its shape; the tied lm_head is not required."""
    Dv = config.vision.hidden_size
    proj = {"multi_modal_projector.linear.weight": (config.projection_dim, Dv),
            "multi_modal_projector.linear.bias": (config.projection_dim,)}
    return {**_vision_shapes(config), **proj, **_text_shapes(config)}


def paligemma_schema(config: PaliGemmaConfig) -> Schema:
    """The checkpoint reader's view of a PaliGemma folder: required tensors, the optional tied head, names."""
    return Schema(required=expected_shapes(config),
                  optional={LM_HEAD: (config.text.vocab_size, config.text.hidden_size)},
                  rename=lambda key: canonical_name(key, config))


