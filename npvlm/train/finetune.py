"""The fine-tuning loop: JSONL rows in, a complete model folder out, the same loop for every model family.

    finetune(model_dir, data, out_dir, steps=100, batch_size=4, lr=None, optimizer="sgd", trainable="attention",
             lora_rank=8, lora_alpha=8.0, save_adapter=False, seed=0, json_path=None, overwrite=False,
             backend="numpy", progress=True) -> {"curve": [...], "out": out_dir, ...}

is `npvlm finetune` (npvlm/apps/finetune.py) without the parser. Its pieces, for a caller with its own loop:

    read_rows(path, fields)          [(line number, row)], every row checked before any training
    rows_at(rows, step, B)           the B rows of a step: file order, B at a time, wrapping round
    train(task, sel, opt, rows, steps=, batch_size=, seed=, on_step=)   -> (trained arrays, optimiser state)
    folder.write_folder(out_dir, write, overwrite=)   write(tmp) into a fresh folder beside out_dir, then
                                     rename: an error or Ctrl-C leaves out_dir complete or absent

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
import sys
import time

from ..errors import ConfigError, NpvlmError, show, show_path
from .folder import check_out_dir, write_folder, write_json
from .optim import OPTIMIZERS, SELECTIONS, select

DEFAULT_LR = {"sgd": 0.03, "adamw": 2e-5}
MAX_LINE_BYTES = 1 << 20


def _paligemma(model_dir, backend):
    from .paligemma_task import PaliGemmaTask

    return PaliGemmaTask.load(model_dir, backend)


def _siglip(model_dir, backend):
    from .siglip_task import SiglipTask

    return SiglipTask.load(model_dir, backend)


TASKS = {"paligemma": _paligemma, "siglip": _siglip}  # config.json model_type -> task(model_dir, backend)


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
# All of it


def finetune(model_dir, data, out_dir, *, steps: int = 100, batch_size: int = 4, lr: float | None = None,
             optimizer: str = "sgd", trainable: str = "attention", lora_rank: int = 8, lora_alpha: float = 8.0,
             save_adapter: bool = False, seed: int = 0, json_path=None, overwrite: bool = False, backend="numpy",
             progress: bool = True, loss: str | None = None) -> dict:
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
    if loss is not None and loss not in getattr(task, "losses", ()):  # a task with a choice lists it (SigLIP)
        raise ConfigError(f"--loss {loss!r}: a {mt or 'paligemma'} folder does not train with it")
    if loss is not None:
        task.loss = loss
    rows = read_rows(data, task.fields)
    for n, row in rows:
        try:
            task.check_row(row)
        except NpvlmError as e:
            raise type(e)(f"{show_path(data)}:{n}: {e}") from None
    sel = getattr(task, "select", select)(trainable, task.params, rank=lora_rank, alpha=lora_alpha)  # a task may name its own
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
               "seed": seed, "rows": len(rows), "loss": getattr(task, "loss", None), "curve": meter.curve}
    if json_path is not None:
        write_json(json_path, summary, indent=1)
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
