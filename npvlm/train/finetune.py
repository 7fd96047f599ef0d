"""The fine-tuning loop: JSONL rows in, a complete model folder out, the same loop for every model family.

    finetune(model_dir, data, out_dir, steps=100, batch_size=4, lr=None, optimizer="sgd", trainable="attention",
             lora_rank=8, lora_alpha=8.0, save_adapter=False, seed=0, json_path=None, overwrite=False,
             backend="numpy", progress=True) -> {"curve": [...], "out": out_dir, ...}

is `npvlm finetune` (npvlm/apps/finetune.py) without the parser. Its pieces, for a caller with its own loop:

    read_rows(path, fields)          [(line number, row)], every row checked before any training
    rows_at(rows, step, B)           the B rows of a step: file order, B at a time, wrapping round
    train(task, sel, opt, rows, steps=, batch_size=, seed=, on_step=)   -> (trained arrays, optimiser state)
    write_folder(out_dir, write, overwrite=)   write(tmp) into a fresh folder beside out_dir, then rename:
                                     an error or Ctrl-C leaves out_dir complete or absent, never half written

A model family plugs in as a *task*, picked by config.json's model_type (TASKS):

    task.fields                      {JSONL key: "image" | "text"}; an image is a path relative to the JSONL file
    task.params                      {name: float32 array on the backend}, the whole model, flat
    task.check_row(row)              raise an NpvlmError for a row the model cannot take (too long, ...)
    task.batch(rows)                 the rows -> one batch on the backend
    task.loss_and_grads(params, batch, wanted) -> (loss scalar, {name: grad}) holding at least `wanted`
    task.save(folder, params)        a model folder HF and npvlm.load read; task.save_adapter(folder, sel, train)

Learning rates by default (constant, no schedule or warm-up): SGD 0.03, as big_vision's PaliGemma colab
(attention only, plain SGD); AdamW 2e-5, as HF's PaliGemma fine-tuning guide.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time

from ..errors import ConfigError, NpvlmError, show, show_path
from .optim import OPTIMIZERS, SELECTIONS, select

DEFAULT_LR = {"sgd": 0.03, "adamw": 2e-5}
MAX_LINE_BYTES = 1 << 20


def _paligemma(model_dir, backend):
    from .paligemma_task import PaliGemmaTask

    return PaliGemmaTask.load(model_dir, backend)


TASKS = {"paligemma": _paligemma}  # config.json model_type -> task(model_dir, backend)


# ---------------------------------------------------------------------------------------------
# Data


def read_rows(path, fields: dict) -> list:
    """The JSONL file's rows as [(line number, {key: value})], images resolved to paths and opened once.
    The first bad row raises a one-line error naming the file, the line and the field."""
    from ..io.images import load_image

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{show_path(path)}: --data: no such file")
    base, rows, opened = os.path.dirname(os.path.abspath(path)), [], set()
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{show_path(path)}:{n}"
            if len(raw) > MAX_LINE_BYTES:
                raise ConfigError(f"{where}: line longer than {MAX_LINE_BYTES} bytes")
            if not raw.strip():
                continue  # blank lines (a trailing newline) hold no row
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ConfigError(f"{where}: not UTF-8 (byte {e.start})") from None
            except ValueError as e:
                raise ConfigError(f"{where}: bad JSON ({e})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{where}: a row must be a JSON object with {', '.join(map(repr, fields))}, "
                                  f"got {type(row).__name__}")
            for key, kind in fields.items():
                if key not in row:
                    raise ConfigError(f"{where}: missing key {key!r} (a row needs {', '.join(map(repr, fields))})")
                if not isinstance(row[key], str):
                    raise ConfigError(f"{where}: {key!r} must be a string, got {show(row[key])}")
                if kind == "image":
                    row[key] = os.path.join(base, row[key])
                    if not os.path.isfile(row[key]):
                        raise ConfigError(f"{where}: {key!r}: image {show_path(row[key])} does not exist")
                    try:
                        if row[key] not in opened:  # decoded once here, so a bad file stops nothing mid-training
                            load_image(row[key])
                    except NpvlmError as e:
                        raise ConfigError(f"{where}: {key!r}: {e}") from None
                    opened.add(row[key])
            rows.append((n, {k: row[k] for k in fields}))
    if not rows:
        raise ConfigError(f"{show_path(path)}: no rows (each line a JSON object with {', '.join(map(repr, fields))})")
    return rows


def rows_at(rows: list, step: int, batch_size: int) -> list:
    """Step `step` (from 0) takes rows [step * B, (step + 1) * B) of the file, indices modulo the row count."""
    return [rows[(step * batch_size + i) % len(rows)] for i in range(batch_size)]


# ---------------------------------------------------------------------------------------------
# The loop


def train(task, sel, opt, rows, *, steps: int, batch_size: int, seed: int = 0, on_step=None):
    """`steps` optimiser steps over `rows` (dicts) -> (the trained arrays of `sel`, the optimiser state).
    on_step(step, loss float) is called after each step (step counts from 1)."""
    flat = task.params
    trained = sel.init(flat, seed)
    state = opt.init(trained)
    wanted = sel.needs
    for step in range(steps):
        batch = task.batch(rows_at(rows, step, batch_size))
        loss, grads = task.loss_and_grads(sel.model(flat, trained), batch, wanted)
        trained, state = opt.step(trained, sel.grads(grads, trained), state)
        if on_step is not None:
            on_step(step + 1, float(loss))
    return trained, state


class Progress:
    """On a terminal a tqdm bar (when tqdm is installed); otherwise plain lines, no carriage returns."""

    def __init__(self, steps: int, batch_size: int, stream=sys.stderr):
        self.steps, self.batch_size, self.stream, self.curve = steps, batch_size, stream, []
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if hasattr(stream, "isatty") and stream.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=steps, file=stream, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def __call__(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        rate = self.batch_size / max(now - self.last, 1e-9)
        self.last = now
        self.curve.append({"step": step, "loss": loss, "examples_per_second": rate, "elapsed_seconds": now - self.t0})
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {rate:.1f} examples/s")
            self.bar.update(1)
        elif self.stream is not None and (step in (1, self.steps) or step % max(1, self.steps // 20) == 0):
            self.stream.write(f"step {step}/{self.steps}  loss {loss:.4f}  {rate:.1f} examples/s  "
                              f"{now - self.t0:.1f} s\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# The output folder


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


def _write_json(path, obj) -> None:
    tmp = f"{path}.partial-{secrets.token_hex(4)}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# All of it


def finetune(model_dir, data, out_dir, *, steps: int = 100, batch_size: int = 4, lr: float | None = None,
             optimizer: str = "sgd", trainable: str = "attention", lora_rank: int = 8, lora_alpha: float = 8.0,
             save_adapter: bool = False, seed: int = 0, json_path=None, overwrite: bool = False, backend="numpy",
             progress: bool = True) -> dict:
    """Check everything, train, save (see the module docstring); returns the run's summary and loss curve."""
    from .. import api
    from ..backends import get_backend

    model_dir = os.fspath(model_dir) if model_dir else api.EMBEDDED_MODEL
    lr = _check_options(steps, batch_size, lr, optimizer, trainable, lora_alpha, save_adapter)
    check_out_dir(out_dir, overwrite, model_dir if os.path.isdir(model_dir) else None)
    if json_path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(json_path))):
        raise ConfigError(f"{show_path(json_path)}: --json: the folder does not exist")
    mt = api.model_type(model_dir)
    if mt is not None and mt not in TASKS:
        raise ConfigError(f"{show_path(model_dir)}: model_type {mt!r}: npvlm finetune trains "
                          f"{', '.join(TASKS)} folders")
    task = TASKS[mt or "paligemma"](model_dir, get_backend(backend))  # None: the loader says what is missing
    rows = read_rows(data, task.fields)
    for n, row in rows:
        try:
            task.check_row(row)
        except NpvlmError as e:
            raise type(e)(f"{show_path(data)}:{n}: {e}") from None
    sel = select(trainable, task.params, rank=lora_rank, alpha=lora_alpha)
    meter = Progress(steps, batch_size, sys.stderr if progress else None)
    try:
        trained, _ = train(task, sel, OPTIMIZERS[optimizer](lr), [r for _, r in rows], steps=steps,
                           batch_size=batch_size, seed=seed, on_step=meter)
    finally:
        meter.close()
    lora = trainable == "lora"
    summary = {"model": model_dir, "data": os.fspath(data), "out": os.fspath(out_dir), "model_type": mt or "paligemma",
               "steps": steps, "batch_size": batch_size, "lr": lr, "optimizer": optimizer, "train": trainable,
               "lora_rank": lora_rank if lora else None, "lora_alpha": lora_alpha if lora else None,
               "seed": seed, "rows": len(rows), "curve": meter.curve}
    if json_path is not None:
        _write_json(json_path, summary)
    if save_adapter:
        write_folder(out_dir, lambda tmp: task.save_adapter(tmp, sel, trained), overwrite=overwrite)
    else:
        write_folder(out_dir, lambda tmp: task.save(tmp, sel.merged(task.params, trained)), overwrite=overwrite)
    return summary


def _check_options(steps, batch_size, lr, optimizer, trainable, lora_alpha, save_adapter) -> float:
    """One line for the first bad option; the learning rate to use."""
    for name, v in (("--steps", steps), ("--batch-size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {show(v)}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown --optimizer {optimizer!r} (expected one of: {', '.join(OPTIMIZERS)})")
    if trainable not in SELECTIONS:
        raise ConfigError(f"unknown --train {trainable!r} (expected one of: {', '.join(SELECTIONS)})")
    if save_adapter and trainable != "lora":
        raise ConfigError(f"--save-adapter saves LoRA adapters: it needs --train lora, not {trainable!r}")
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    for name, v in (("--lr", lr), ("--lora-alpha", lora_alpha)):
        if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
            raise ConfigError(f"{name} must be a positive number, got {show(v)}")
    return float(lr)
