"""PaliGemma as a fine-tuning task (the interface in finetune.py): rows {"image", "prefix", "suffix"}.

The loss is HF PaliGemmaForConditionalGeneration's for processor(images, text=prefix, suffix=suffix)
(paligemma_grad.py); the model trains in float32 (a bf16 checkpoint is widened when it is loaded).

What `save` writes, a folder HF's from_pretrained and npvlm.load both read:
    config.json          the input's, with dtype float32
    model.safetensors    every weight in float32 under the names the input checkpoint used (hub, transformers
                         5 flat vision tower, in-memory names: what transformers 5.24's save_pretrained does
                         after loading that checkpoint); the tied lm_head is not written, as save_pretrained
    the rest             every other file of the input folder (tokenizer, processor, generation config), copied
What `save_adapter` writes (--save-adapter, LoRA), the layout HF PEFT's save_pretrained writes:
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight [r, in] / .lora_B.weight [out, r], with
                                <module> transformers 5's in-memory name, model.language_model.layers.J.self_attn.q_proj
    adapter_config.json         peft_type LORA, r, lora_alpha, target_modules (a regex: the decoder's projections
                                only, not the vision tower's q/k/v), base_model_name_or_path = the input folder
    the tokenizer and processor files, copied
"""

from __future__ import annotations

import json
import os
import shutil

from ..errors import ConfigError, show_path
from ..io.checkpoint import checkpoint_files, read_headers, unflatten
from ..models.paligemma_inputs import check_length, load_images, pixel_batch, prompt_ids
from ..models.paligemma_schema import LM_HEAD, canonical_name
from .optim import LORA_TARGETS, flatten
from .paligemma_grad import loss_and_grads, make_batch

FROZEN_TOWERS = ("vision_tower.", "multi_modal_projector.")
PEFT_TARGETS = r".*language_model.*\.layers\.\d+\.(" + "|".join(t.replace(".", r"\.") for t in LORA_TARGETS) + ")"


class PaliGemmaTask:
    fields = {"image": "image", "prefix": "text", "suffix": "text"}

    def __init__(self, model, model_dir: str):
        self.model, self.model_dir = model, model_dir
        self.params = flatten(model.params)
        odd = [k for k, v in self.params.items() if not hasattr(v, "dtype") or v.dtype != model.backend.xp.float32]
        if odd:
            raise ConfigError(f"{show_path(model_dir)}: {odd[0]} is not a float32 array (an int8 folder written by "
                              f"`npvlm quantize`?): fine-tune the float32 or bfloat16 original")

    @classmethod
    def load(cls, model_dir, backend) -> "PaliGemmaTask":
        from ..api import load

        return cls(load(model_dir, backend, want="paligemma"), model_dir)

    def check_row(self, row) -> None:
        m = self.model
        ids, _ = prompt_ids(m.tokenizer, row["prefix"], m.config.num_image_tokens, suffix=row["suffix"])
        check_length(m.config, len(ids), 0)

    def batch(self, rows):
        m = self.model
        pixels = pixel_batch(load_images([r["image"] for r in rows]), m.processor, m.backend)  # [B, 3, S, S]
        return make_batch(m.tokenizer, m.config, m.backend.xp, pixels, [r["prefix"] for r in rows],
                          [r["suffix"] for r in rows])

    def loss_and_grads(self, params: dict, batch, wanted=None):
        vision = wanted is None or any(k.startswith(FROZEN_TOWERS) for k in wanted)
        loss, grads = loss_and_grads(unflatten(params), batch, self.model.config, vision=vision)
        return loss, flatten(grads)

    # --- saving -------------------------------------------------------------------------------

    def save(self, folder, params: dict) -> None:
        from safetensors.numpy import save_file

        names = self._file_names()
        host = {names[k]: _host(self.model.backend, v) for k, v in params.items()}
        save_file(host, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(self.model_dir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        for c in (config, config.get("text_config"), config.get("vision_config")):
            if isinstance(c, dict):
                c.pop("torch_dtype", None)
                c["dtype"] = "float32"
        config.pop("npvlm_quantization", None)
        _dump(os.path.join(folder, "config.json"), config)
        self._copy_side_files(folder)

    def save_adapter(self, folder, sel, train: dict) -> None:
        from safetensors.numpy import save_file

        prefix = "language_model.model."
        host = {"base_model.model.model.language_model." + k[len(prefix):]: _host(self.model.backend, v)
                for k, v in train.items()}  # transformers 5's in-memory module names
        save_file(host, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": os.path.abspath(self.model_dir),
                  "r": sel.rank, "lora_alpha": sel.alpha, "lora_dropout": 0.0, "target_modules": PEFT_TARGETS,
                  "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
                  "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}
        _dump(os.path.join(folder, "adapter_config.json"), config)
        self._copy_side_files(folder)

    def _file_names(self) -> dict:
        """{canonical name: the name the input checkpoint stores it under}."""
        headers, _ = read_headers(self.model_dir)
        names = {}
        for infos in headers.values():
            for raw in infos:
                canon = canonical_name(raw, self.model.config)
                if canon is not None and canon != LM_HEAD:
                    names[canon] = raw
        return names

    def _copy_side_files(self, folder) -> None:
        skip = {os.path.basename(p) for p in checkpoint_files(self.model_dir)} | {"config.json"}
        for name in sorted(os.listdir(self.model_dir)):
            src = os.path.join(self.model_dir, name)
            weights = name.endswith((".safetensors", ".safetensors.index.json")) or name.startswith("adapter_")
            if name not in skip and not weights and os.path.isfile(src):
                shutil.copy2(src, os.path.join(folder, name))


def _host(backend, x):
    import numpy as np

    return np.ascontiguousarray(backend.to_host(x), dtype=np.float32)


def _dump(path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
