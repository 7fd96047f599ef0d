"""What a SigLIP (two-tower) checkpoint holds: every tensor's HF name and shape, from config.json.

Names are those of HF `SiglipModel` files (google/siglip-*): `vision_model.*` (with the MAP head
`vision_model.head.*`), `text_model.*`, `logit_scale` [1], `logit_bias` [1].
"""

from __future__ import annotations

from ..io.checkpoint import Schema
from .siglip_config import SiglipConfig


def _encoder(prefix: str, D: int, F: int, layers: int) -> dict[str, tuple[int, ...]]:
    s = {}
    for i in range(layers):
        p = f"{prefix}encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            s[p + norm + ".weight"] = s[p + norm + ".bias"] = (D,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[f"{p}self_attn.{proj}.weight"], s[f"{p}self_attn.{proj}.bias"] = (D, D), (D,)
        s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = (F, D), (F,)
        s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = (D, F), (D,)
    return s


def expected_shapes(config: SiglipConfig) -> dict[str, tuple[int, ...]]:
    v, t = config.vision, config.text
    Dv, Fv, P, Dt = v.hidden_size, v.intermediate_size, v.patch_size, t.hidden_size
    vm, tm = "vision_model.", "text_model."
    s = {vm + "embeddings.patch_embedding.weight": (Dv, v.num_channels, P, P),
         vm + "embeddings.patch_embedding.bias": (Dv,),
         vm + "embeddings.position_embedding.weight": (v.num_patches, Dv),
         **_encoder(vm, Dv, Fv, v.num_hidden_layers)}
    s[vm + "post_layernorm.weight"] = s[vm + "post_layernorm.bias"] = (Dv,)
    h = vm + "head."
    s[h + "probe"] = (1, 1, Dv)
    s[h + "attention.in_proj_weight"], s[h + "attention.in_proj_bias"] = (3 * Dv, Dv), (3 * Dv,)
    s[h + "attention.out_proj.weight"], s[h + "attention.out_proj.bias"] = (Dv, Dv), (Dv,)
    s[h + "layernorm.weight"] = s[h + "layernorm.bias"] = (Dv,)
    s[h + "mlp.fc1.weight"], s[h + "mlp.fc1.bias"] = (Fv, Dv), (Fv,)
    s[h + "mlp.fc2.weight"], s[h + "mlp.fc2.bias"] = (Dv, Fv), (Dv,)
    s[tm + "embeddings.token_embedding.weight"] = (t.vocab_size, Dt)
    s[tm + "embeddings.position_embedding.weight"] = (t.max_position_embeddings, Dt)
    s.update(_encoder(tm, Dt, t.intermediate_size, t.num_hidden_layers))
    s[tm + "final_layer_norm.weight"] = s[tm + "final_layer_norm.bias"] = (Dt,)
    s[tm + "head.weight"], s[tm + "head.bias"] = (t.head_size, Dt), (t.head_size,)
    s["logit_scale"] = s["logit_bias"] = (1,)
    return s


def _rename(key: str) -> str:
    """transformers' in-memory names (`model.` prefixed, as some exporters write) -> the file names."""
    return key[len("model."):] if key.startswith("model.") else key


def siglip_schema(config: SiglipConfig) -> Schema:
    """The checkpoint reader's view of a SigLIP folder (no optional tensors: nothing is tied)."""
    return Schema(required=expected_shapes(config), rename=_rename)
