"""The fine-tuning loop: JSONL rows in, a complete model folder out, the same loop for every model family.

    finetune(model_dir, data, out_dir, steps=100, batch_size=4, lr=None, optimizer="sgd", trainable="attention",
             lora_rank=8, lora_alpha=8.0, save_adapter=False, seed=0, json_path=None, overwrite=False,
             backend="numpy", progress=True, loss=None, weight_decay=None, lr_schedule="constant",
             warmup_steps=0) -> {"curve": [...], "out": out_dir, ...}

is `npvlm finetune` (npvlm/apps/finetune.py) without the parser. Its pieces, for a caller with its own loop:

    read_rows(path, fields)          [(line number, row)], every row checked before any training
    rows_at(rows, step, B)           the B rows of a step: file order, B at a time, wrapping round
    train(task, sel, opt, rows, steps=, batch_size=, seed=, on_step=, lr_schedule=, warmup_steps=)
                                     -> (trained arrays, optimiser state); step t's lr is schedule.lr_at(t)
    folder.write_folder(out_dir, write, overwrite=)   write(tmp) into a fresh folder beside out_dir, then
                                     rename: an error or Ctrl-C leaves out_dir complete or absent

A model family plugs in as a *task*, picked by config.json's model_type (TASKS):

    task.fields                      {JSONL key: "image" | "text"}; an image is a path relative to the JSONL file
    task.params                      {name: float32 array on the backend}, the whole model, flat
    task.check_row(row)              raise an NpvlmError for a row the model cannot take (too long, ...)
    task.batch(rows)                 the rows -> one batch on the backend
    task.loss_and_grads(params, batch, wanted) -> (loss scalar, {name: grad}) holding at least `wanted`
    task.save(folder, params)        a model folder HF and npvlm.load read; task.save_adapter(folder, sel, train)
                                     PEFT's adapter folder (both written with folder.py's write_model / write_adapter)
    task.select(kind, flat, rank=, alpha=)   optional: the task's own --train selections (default optim.select,
                                     which knows PaliGemma's decoder names)
    task.losses, task.loss           optional: the --loss choices, the first the default (SigLIP's sigmoid / clip)

Learning rates by default: SGD 0.03, as big_vision's PaliGemma colab (attention only, plain SGD); AdamW 2e-5,
as HF's PaliGemma fine-tuning guide, with torch's weight decay 0.01 (decoupled: p <- p (1 - lr wd) each step).
The lr is constant unless lr_schedule is "cosine" or "linear" and/or warmup_steps > 0 (schedule.py, HF's
get_*_schedule_with_warmup step for step); the given lr is then the peak.
"""

from __future__ import annotations

import json
import os
import sys
import time

from ..errors import ConfigError, NpvlmError, show, show_path
from .folder import check_out_dir, write_folder, write_json
from .optim import OPTIMIZERS, SELECTIONS, adamw, select, sgd
from .schedule import SCHEDULES, lr_at

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


def train(task, sel, opt, rows, *, steps: int, batch_size: int, seed: int = 0, on_step=None,
          lr_schedule: str = "constant", warmup_steps: int = 0):
    """`steps` optimiser steps over `rows` (dicts) -> (the trained arrays of `sel`, the optimiser state).
    Step t (from 0) uses the lr schedule.lr_at(lr_schedule, t, opt.lr, ...) gives: opt.lr itself at every step
    for the default constant schedule without warm-up. on_step(step, loss, lr) is called after each step, its
    loss (before the update) and lr as Python floats, step counted from 1."""
    flat = task.params
    trained = sel.init(flat, seed)
    state = opt.init(trained)
    wanted = sel.needs
    for step in range(steps):
        lr = lr_at(lr_schedule, step, opt.lr, steps=steps, warmup=warmup_steps)
        batch = task.batch(rows_at(rows, step, batch_size))
        loss, grads = task.loss_and_grads(sel.model(flat, trained), batch, wanted)
        trained, state = opt.step(trained, sel.grads(grads, trained), state, lr=lr)
        if on_step is not None:
            on_step(step + 1, float(loss), lr)
    return trained, state


class Progress:
    """On a terminal a tqdm bar (when tqdm is installed); otherwise plain lines, no carriage returns. Each step
    is kept in .curve (step, loss, lr, examples/s, elapsed seconds); show_lr adds the lr to what is printed."""

    def __init__(self, steps: int, batch_size: int, stream=None, show_lr: bool = False):
        stream = sys.stderr if stream is None else stream  # the stderr of now, not of import time
        self.steps, self.batch_size, self.stream, self.curve, self.show_lr = steps, batch_size, stream, [], show_lr
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if hasattr(stream, "isatty") and stream.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=steps, file=stream, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def __call__(self, step: int, loss: float, lr: float) -> None:
        now = time.perf_counter()
        rate = self.batch_size / max(now - self.last, 1e-9)
        self.last = now
        self.curve.append({"step": step, "loss": loss, "lr": lr, "examples_per_second": rate,
                           "elapsed_seconds": now - self.t0})
        lr_text = f"lr {lr:.3g}" if self.show_lr else ""
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {lr_text + ', ' if lr_text else ''}{rate:.1f} examples/s")
            self.bar.update(1)
        elif self.stream is not None and (step in (1, self.steps) or step % max(1, self.steps // 20) == 0):
            self.stream.write(f"step {step}/{self.steps}  loss {loss:.4f}  {lr_text + '  ' if lr_text else ''}"
                              f"{rate:.1f} examples/s  {now - self.t0:.1f} s\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# All of it


def finetune(model_dir, data, out_dir, *, steps: int = 100, batch_size: int = 4, lr: float | None = None,
             optimizer: str = "sgd", trainable: str = "attention", lora_rank: int = 8, lora_alpha: float = 8.0,
             save_adapter: bool = False, seed: int = 0, json_path=None, overwrite: bool = False, backend="numpy",
             progress: bool = True, loss: str | None = None, weight_decay: float | None = None,
             lr_schedule: str = "constant", warmup_steps: int = 0) -> dict:
    """Check everything, train, save (see the module docstring); returns the run's summary and loss curve."""
    from .. import api
    from ..backends import get_backend

    model_dir = os.fspath(model_dir) if model_dir else api.EMBEDDED_MODEL
    opt = _check_options(steps, batch_size, lr, optimizer, trainable, lora_alpha, save_adapter, weight_decay,
                         lr_schedule, warmup_steps)
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
    scheduled = lr_schedule != "constant" or warmup_steps > 0
    meter = Progress(steps, batch_size, sys.stderr if progress else None, show_lr=scheduled)
    try:
        trained, _ = train(task, sel, opt, [r for _, r in rows], steps=steps, batch_size=batch_size, seed=seed,
                           on_step=meter, lr_schedule=lr_schedule, warmup_steps=warmup_steps)
    finally:
        meter.close()
    lora = trainable == "lora"
    summary = {"model": model_dir, "data": os.fspath(data), "out": os.fspath(out_dir), "model_type": mt or "paligemma",
               "steps": steps, "batch_size": batch_size, "lr": opt.lr, "lr_schedule": lr_schedule,
               "warmup_steps": warmup_steps, "weight_decay": getattr(opt, "weight_decay", 0.0),
               "optimizer": optimizer, "train": trainable,
               "lora_rank": lora_rank if lora else None, "lora_alpha": lora_alpha if lora else None,
               "seed": seed, "rows": len(rows), "loss": getattr(task, "loss", None), "curve": meter.curve}
    if json_path is not None:
        write_json(json_path, summary, indent=1)
    if save_adapter:
        write_folder(out_dir, lambda tmp: task.save_adapter(tmp, sel, trained), overwrite=overwrite)
    else:
        write_folder(out_dir, lambda tmp: task.save(tmp, sel.merged(task.params, trained)), overwrite=overwrite)
    return summary


def _check_options(steps, batch_size, lr, optimizer, trainable, lora_alpha, save_adapter, weight_decay,
                   lr_schedule, warmup_steps):
    """One line for the first bad option; the optimiser to train with (its lr the peak of the schedule)."""
    for name, v in (("--steps", steps), ("--batch-size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {show(v)}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown --optimizer {optimizer!r} (expected one of: {', '.join(OPTIMIZERS)})")
    if trainable not in SELECTIONS:
        raise ConfigError(f"unknown --train {trainable!r} (expected one of: {', '.join(SELECTIONS)})")
    if save_adapter and trainable != "lora":
        raise ConfigError(f"--save-adapter saves LoRA adapters: it needs --train lora, not {trainable!r}")
    if lr_schedule not in SCHEDULES:
        raise ConfigError(f"unknown --lr-schedule {lr_schedule!r} (expected one of: {', '.join(SCHEDULES)})")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ConfigError(f"--warmup-steps must be an integer >= 0, got {show(warmup_steps)}")
    if warmup_steps >= steps and warmup_steps > 0:
        raise ConfigError(f"--warmup-steps {warmup_steps} must be below --steps {steps} (the lr would never reach --lr)")
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    for name, v in (("--lr", lr), ("--lora-alpha", lora_alpha)):
        if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
            raise ConfigError(f"{name} must be a positive number, got {show(v)}")
    if weight_decay is not None and not (isinstance(weight_decay, (int, float)) and 0 <= weight_decay < float("inf")):
        raise ConfigError(f"--weight-decay must be a number >= 0, got {show(weight_decay)}")
    if optimizer == "sgd":
        if weight_decay:
            raise ConfigError(f"--weight-decay {weight_decay:g}: plain SGD has no weight decay (big_vision's recipe); "
                              f"it is AdamW's (--optimizer adamw)")
        return sgd(lr)
    return adamw(lr) if weight_decay is None else adamw(lr, weight_decay=weight_decay)  # torch's default: 0.01
