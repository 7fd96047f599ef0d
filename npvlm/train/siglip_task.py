"""SigLIP as a fine-tuning task (the interface in finetune.py): rows {"image": path, "text": "a red circle"}.

A batch of B rows is B matching (image, text) pairs and B^2 - B non-matching ones; the loss is HF
SiglipModel(..., return_loss=True)'s sigmoid loss (`--loss clip`: CLIP's softmax loss over the same logits),
computed by siglip_model_grad.py. Texts are padded to the model's max length and the padding is attended
to, as HF does without an attention_mask (and as SigLIP is trained).

What `--train` selects (task.select):
    attention  the q/k/v/out_proj weights and biases of every encoder layer of both towers (not the MAP head's
               packed attention, which `all` trains)
    all        every parameter, logit_scale and logit_bias included
    lora       adapters on q/k/v/out_proj and mlp.fc1/fc2 of every encoder layer of both towers (optim.Selection)
What `save` writes: config.json (dtype float32), model.safetensors under HF SiglipModel's names (what
save_pretrained writes), every other file of the input folder copied (spiece.model, tokenizer and processor
configs). `save_adapter`: PEFT's layout, adapter_model.safetensors + adapter_config.json.
"""

from __future__ import annotations

from ..errors import ConfigError, show_path
from ..io.checkpoint import unflatten
from ..models.paligemma_inputs import load_images, pixel_batch
from .folder import host_float32, write_adapter, write_model
from .optim import SELECTIONS, Selection, flatten
from .siglip_model_grad import LOSSES, loss_and_grads, make_batch

ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_TARGETS = (*(f"self_attn.{p}" for p in ATTENTION), "mlp.fc1", "mlp.fc2")
TOWERS = ("vision_model.encoder.layers.", "text_model.encoder.layers.")
PEFT_TARGETS = r".*_model\.encoder\.layers\.\d+\.(" + "|".join(t.replace(".", r"\.") for t in LORA_TARGETS) + ")"


class SiglipTask:
    fields = {"image": "image", "text": "text"}
    losses = LOSSES  # --loss; the first is the default

    def __init__(self, model, model_dir: str, loss: str = LOSSES[0]):
        self.model, self.model_dir, self.loss = model, model_dir, loss
        self.params = flatten(model.params)
        odd = [k for k, v in self.params.items() if v.dtype != model.backend.xp.float32]
        if odd:
            raise ConfigError(f"{show_path(model_dir)}: {odd[0]} is not a float32 array: fine-tune the float32 original")

    @classmethod
    def load(cls, model_dir, backend) -> "SiglipTask":
        from ..siglip_api import load

        return cls(load(model_dir, backend), model_dir)

    def check_row(self, row) -> None:
        self.model.tokenizer([row["text"]])  # any string tokenises (truncated to the max length, as HF)

    def batch(self, rows):
        m = self.model
        pixels = pixel_batch(load_images([r["image"] for r in rows]), m.processor, m.backend)  # [B, 3, S, S]
        return make_batch(m.tokenizer, m.backend.xp, pixels, [r["text"] for r in rows])

    def loss_and_grads(self, params: dict, batch, wanted=None):
        loss, grads = loss_and_grads(unflatten(params), batch, self.model.config, loss=self.loss)
        return loss, flatten(grads)

    def select(self, kind: str, flat: dict, *, rank: int = 8, alpha: float = 8.0) -> Selection:
        """optim.select's counterpart for SigLIP's names (see the module docstring). LoRA's A matrices are drawn
        module by module: the vision tower's layers, then the text tower's, each layer in LORA_TARGETS' order."""
        if kind == "all":
            return Selection(kind, tuple(flat))
        cfg = self.model.config
        layers = [f"{tower}{j}." for tower, n in zip(TOWERS, (cfg.vision.num_hidden_layers, cfg.text.num_hidden_layers))
                  for j in range(n)]
        if kind == "attention":
            return Selection(kind, tuple(f"{L}self_attn.{p}.{w}" for L in layers for p in ATTENTION for w in ("weight", "bias")))
        if kind == "lora":
            if rank < 1:
                raise ConfigError(f"--lora-rank must be >= 1, got {rank}")
            return Selection(kind, tuple(f"{L}{t}" for L in layers for t in LORA_TARGETS), int(rank), float(alpha))
        raise ConfigError(f"unknown --train {kind!r} (expected one of: {', '.join(SELECTIONS)})")

    # --- saving (folder.py writes the files) ---------------------------------------------------

    def save(self, folder, params: dict) -> None:
        write_model(folder, self.model_dir, {k: host_float32(self.model.backend, v) for k, v in params.items()})

    def save_adapter(self, folder, sel, train: dict) -> None:
        weights = {"base_model.model." + k: host_float32(self.model.backend, v) for k, v in train.items()}
        write_adapter(folder, self.model_dir, sel, weights, target_modules=PEFT_TARGETS, task_type=None)
