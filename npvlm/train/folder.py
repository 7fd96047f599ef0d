"""Writing what fine-tuning produces: an HF model folder or a PEFT adapter folder, all at once or not at all.

    check_out_dir(out_dir, overwrite, model_dir=None)   refuse, before any work, an OUT_DIR that cannot be written
    write_folder(out_dir, write, overwrite=)            write(tmp) into a fresh folder beside out_dir, then rename
    write_model(folder, model_dir, weights)             an HF model folder (below), from {file name: host array}
    write_adapter(folder, model_dir, sel, weights, target_modules=, task_type=)   a PEFT LoRA adapter folder
    host_float32(backend, x), write_json(path, obj), copy_side_files(model_dir, folder)   their pieces

Atomic: write_folder fills `.OUT_DIR.partial-XXXXXXXX` beside OUT_DIR and renames it once everything is on disk,
so an error or a Ctrl-C (KeyboardInterrupt) leaves OUT_DIR complete or absent, never half written; with
overwrite, the old folder is renamed away only then, and put back if the rename fails. The files get the
permissions any file the user makes gets (0o666 less the umask: safetensors writes its files private).

An HF model folder, as transformers' save_pretrained writes one and from_pretrained / npvlm.load read it:
    model.safetensors    every weight, float32, metadata {"format": "pt"}; the names are the task's choice
    config.json          the input's, with "dtype": "float32" in it and in its text_config / vision_config
                         (torch_dtype, transformers 4's spelling, and npvlm quantize's marker dropped)
    the rest             every other file of the input folder (tokenizer, processor, generation config): copied,
                         except weights (*.safetensors, their index, an earlier adapter_*)
A PEFT adapter folder, as peft's save_pretrained writes one (PeftModel.from_pretrained reads it):
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight [r, in], .lora_B.weight [out, r]
    adapter_config.json         LORA, r, lora_alpha, target_modules (a regex over the module names),
                                base_model_name_or_path = the input folder, no dropout, no rsLoRA / DoRA
    the side files, copied as above (the tokenizer and processor come with the adapter)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil

from ..errors import ConfigError, show_path
from ..io.checkpoint import checkpoint_files

# ---------------------------------------------------------------------------------------------
# All at once


def check_out_dir(out_dir, overwrite: bool, model_dir=None) -> None:
    """Refuse, before any work, an OUT_DIR that could not be written or would clobber something."""
    out = os.path.abspath(out_dir)
    parent = os.path.dirname(out)
    if model_dir is not None and os.path.exists(out) and os.path.samefile(out, model_dir):
        raise ConfigError(f"{show_path(out_dir)}: --out is the model folder itself; choose another folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"{show_path(out_dir)}: --out exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ConfigError(f"{show_path(out_dir)}: --out exists and is not empty (pass --overwrite to replace it)")
    if not os.path.isdir(parent):
        raise ConfigError(f"{show_path(out_dir)}: --out: the folder {show_path(parent)} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{show_path(out_dir)}: --out: the folder {show_path(parent)} is not writable")


def write_folder(out_dir, write, *, overwrite: bool = False) -> str:
    """Run write(tmp) on a new folder beside out_dir, then rename it to out_dir (replacing an empty one, or
    with overwrite a full one). Any exception, KeyboardInterrupt included, removes the temporary folder."""
    out = os.path.abspath(out_dir)
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial-{secrets.token_hex(4)}")
    os.mkdir(tmp)  # mode 0o777 less the umask, as any folder the user makes
    old = None
    try:
        write(tmp)
        mode = 0o666 & ~_umask()
        for name in os.listdir(tmp):  # some writers (safetensors) make their files private: as any file instead
            os.chmod(os.path.join(tmp, name), mode)
        if os.path.isdir(out) and os.listdir(out):
            if not overwrite:
                raise ConfigError(f"{show_path(out_dir)}: --out was filled while training (pass --overwrite)")
            old = tmp + ".old"
            os.rename(out, old)
        elif os.path.isdir(out):
            os.rmdir(out)
        os.rename(tmp, out)
    except BaseException:
        if old is not None and not os.path.exists(out):
            os.rename(old, out)  # put the replaced folder back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path, obj, indent: int = 2) -> None:
    """obj as JSON (and a final newline) at path, through a temporary file beside it: complete or absent."""
    tmp = f"{path}.partial-{secrets.token_hex(4)}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# What goes in


def host_float32(backend, x):
    """A backend array as a C-contiguous float32 NumPy array, ready for safetensors."""
    import numpy as np

    return np.ascontiguousarray(backend.to_host(x), dtype=np.float32)


def write_model(folder, model_dir, weights: dict) -> None:
    """The HF model folder of the module docstring: weights {name in the file: host float32 array}, the input
    folder's config (now float32) and side files."""
    from safetensors.numpy import save_file  # looked up now: a test stands a Ctrl-C in for it

    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    for c in (config, config.get("text_config"), config.get("vision_config")):
        if isinstance(c, dict):
            c.pop("torch_dtype", None)
            c["dtype"] = "float32"
    config.pop("npvlm_quantization", None)
    write_json(os.path.join(folder, "config.json"), config)
    copy_side_files(model_dir, folder)


def write_adapter(folder, model_dir, sel, weights: dict, *, target_modules: str, task_type: str | None) -> None:
    """The PEFT folder of the module docstring: weights {PEFT key: host float32 array}, sel the LoRA Selection
    (its rank and alpha), target_modules PEFT's regex, task_type PEFT's ("CAUSAL_LM", or None for a bare model)."""
    from safetensors.numpy import save_file

    save_file(weights, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": os.path.abspath(model_dir),
              "r": sel.rank, "lora_alpha": sel.alpha, "lora_dropout": 0.0, "target_modules": target_modules,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}
    write_json(os.path.join(folder, "adapter_config.json"), config)
    copy_side_files(model_dir, folder)


def copy_side_files(model_dir, folder) -> None:
    """Every file of model_dir but its config and weights (tokenizer, processor, generation config) into folder."""
    skip = {os.path.basename(p) for p in checkpoint_files(model_dir)} | {"config.json"}
    for name in sorted(os.listdir(model_dir)):
        src = os.path.join(model_dir, name)
        weights = name.endswith((".safetensors", ".safetensors.index.json")) or name.startswith("adapter_")
        if name not in skip and not weights and os.path.isfile(src):
            shutil.copy2(src, os.path.join(folder, name))
