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

from ..errors import ConfigError, show_path
from ..io.checkpoint import read_headers, unflatten
from ..models.paligemma_inputs import check_length, load_images, pixel_batch, prompt_ids
from ..models.paligemma_schema import LM_HEAD, canonical_name
from .folder import host_float32, write_adapter, write_model
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

    # --- saving (folder.py writes the files) ---------------------------------------------------

    def save(self, folder, params: dict) -> None:
        names = self._file_names()
        write_model(folder, self.model_dir, {names[k]: host_float32(self.model.backend, v) for k, v in params.items()})

    def save_adapter(self, folder, sel, train: dict) -> None:
        prefix = "language_model.model."  # -> transformers 5's in-memory module names, under PEFT's base_model.model.
        weights = {"base_model.model.model.language_model." + k[len(prefix):]: host_float32(self.model.backend, v)
                   for k, v in train.items()}
        write_adapter(folder, self.model_dir, sel, weights, target_modules=PEFT_TARGETS, task_type="CAUSAL_LM")

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
