"""Mutation testing: does the test suite notice a deliberate mistake in the code?

Each mutant is one plausible bug, written as (file, the exact original text, its replacement, the
tests that should catch it). For each, in turn, the tool copies the repository (npvlm/, backends/,
tests/, tools/, pyproject.toml) into a scratch directory, applies that one edit there, and runs the
mutant's tests with `pytest -x -q`; a failing run *kills* the mutant, a passing one means no test
would have noticed the bug: it SURVIVED. The real tree is never modified.

    python tools/mutate.py                 # all mutants; exit status 1 if any survived
    python tools/mutate.py rope gqa        # only the mutants whose name contains one of these words
    python tools/mutate.py --list

An original text that is not found exactly once is an error (exit 2): the code moved, so the
mutant must be updated rather than silently test nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("npvlm", "backends", "tests", "tools", "pyproject.toml")
TIMEOUT = 300  # seconds per mutant: a hung mutant (an endless loop) counts as killed by the timeout


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    original: str
    replacement: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, "-k" selections


def k(file: str, expr: str) -> tuple[str, ...]:
    return (file, "-k", expr)


MUTANTS = [
    Mutant("rms_norm scales by w, not 1 + w", "npvlm/nn.py",
           "h * (1.0 + xp.astype(weight, xp.float32, copy=False))", "h * xp.astype(weight, xp.float32)",
           k("tests/test_nn.py", "rms_norm")),
    Mutant("gelu_tanh with a wrong cubic constant", "npvlm/nn.py",
           "(x + 0.044715 * (x * x * x))", "(x + 0.047715 * (x * x * x))",
           k("tests/test_nn.py", "gelu_tanh")),
    Mutant("gelu_tanh replaced by the exact erf GELU (differs by < 1e-3)", "npvlm/nn.py",
           "return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))",
           "import numpy\n    erf = numpy.vectorize(math.erf, otypes=[numpy.float32])\n"
           "    return xp.asarray(0.5 * numpy.asarray(x) * (1.0 + erf(numpy.asarray(x) / math.sqrt(2.0))), dtype=x.dtype)",
           k("tests/test_nn.py", "gelu_tanh")),
    Mutant("gelu_tanh replaced by the sigmoid approximation x * sigmoid(1.702 x)", "npvlm/nn.py",
           "return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))",
           "return x / (1.0 + xp.exp(-1.702 * x))",
           k("tests/test_nn.py", "gelu_tanh")),
    Mutant("layer_norm with the unbiased variance", "npvlm/nn.py",
           "var = xp.mean((h - mu) ** 2, axis=-1, keepdims=True)",
           "var = xp.sum((h - mu) ** 2, axis=-1, keepdims=True) / max(h.shape[-1] - 1, 1)",
           k("tests/test_nn.py", "layer_norm")),
    Mutant("rope interleaved (pairs 2i, 2i+1) instead of rotate_half", "npvlm/nn.py",
           "rotated = xp.concat([-x[..., half:], x[..., :half]], axis=-1)",
           "rotated = xp.reshape(xp.stack([-x[..., 1::2], x[..., ::2]], axis=-1), x.shape)",
           k("tests/test_nn.py", "rope")),
    Mutant("gqa: query head h reads kv head h % K instead of h // G", "npvlm/nn.py",
           "qg = xp.reshape(q, (B, K, G * T, E))",
           "qg = xp.reshape(xp.permute_dims(xp.reshape(q, (B, G, K, T, E)), (0, 2, 1, 3, 4)), (B, K, G * T, E))",
           k("tests/test_nn.py", "attention_matches_torch")),
    Mutant("gemma2 attention soft-cap after the mask, not before", "npvlm/nn.py",
           "    if softcap is not None:\n        s = softcap * xp.tanh(s / softcap)\n    s = xp.reshape(s, (B, K, G, T, S))\n",
           "    s = xp.reshape(s, (B, K, G, T, S))\n    if mask is not None:\n        s = s + mask[:, :, None, :, :]\n"
           "    if softcap is not None:\n        s = softcap * xp.tanh(s / softcap)\n    mask = None\n",
           k("tests/test_nn.py", "attention_matches_torch")),
    Mutant("kv cache: prefill writes its keys one column late", "npvlm/kv_cache.py",
           "self.k[layer][:, :, at:end, :] = k", "self.k[layer][:, :, at + 1:end + 1, :] = k[:, :, :self.capacity - at - 1, :]",
           k("tests/test_nn.py", "kv_cache")),
    Mutant("kv cache: the reference write_columns writes one column late", "npvlm/kv_cache.py",
           "xp.reshape(xp.arange(C, dtype=cols.dtype), (1, 1, C, 1)) == xp.reshape(cols, (B, 1, 1, 1))",
           "xp.reshape(xp.arange(C, dtype=cols.dtype), (1, 1, C, 1)) == xp.reshape(cols + 1, (B, 1, 1, 1))",
           ("tests/test_fast_ops.py",)),  # numpy runs the replacement; the grid compares it with the reference
    Mutant("numpy backend: the in-place write_columns writes one column late", "backends/numpy_backend.py",
           "cache[np.arange(cache.shape[0]), :, np.asarray(cols), :] = new[:, :, 0, :]",
           "cache[np.arange(cache.shape[0]), :, (np.asarray(cols) + 1) % cache.shape[2], :] = new[:, :, 0, :]",
           ("tests/test_fast_ops.py",)),
    Mutant("top-p keeps the token whose preceding mass equals top_p (< -> <=)", "npvlm/generation/sampling.py",
           "xp.cumulative_sum(p, axis=-1) - p < top_p", "xp.cumulative_sum(p, axis=-1) - p <= top_p",
           k("tests/test_generate.py", "sampler")),
    Mutant("embed without the sqrt(D) scale", "npvlm/models/gemma.py",
           "return xp.reshape(e, (B, T, cfg.hidden_size)) * scale", "return xp.reshape(e, (B, T, cfg.hidden_size))",
           k("tests/test_model_hf.py", "test_logits_match_hf and mqa-4tok and caption")),
    Mutant("gemma2 final logit soft-cap dropped", "npvlm/models/gemma.py",
           "return c * xp.tanh(logits / c) if c else logits", "return logits",
           k("tests/test_paligemma2.py", "test_logits_match_hf")),
    Mutant("prefix-LM mask made fully causal", "npvlm/models/paligemma.py",
           "bidir = prefix[:, start:, None] & prefix[:, None, :]  # [B, T, S]",
           "bidir = prefix[:, start:, None] & prefix[:, None, :] & (ki <= qi)  # [B, T, S]",
           k("tests/test_inputs.py", "prefix_lm")),
    Mutant("prefill sliding window one key too wide", "npvlm/models/paligemma.py",
           "local = causal & (ki > qi - W)", "local = causal & (ki >= qi - W)",
           k("tests/test_inputs.py", "prefix_lm")),
    Mutant("decode sliding window one key too wide", "npvlm/models/paligemma.py",
           "(key_valid & (ki <= q) & (ki > q - W))", "(key_valid & (ki <= q) & (ki >= q - W))",
           k("tests/test_inputs.py", "decode_masks")),
    Mutant("decode mask lets a token see the column after its own", "npvlm/models/paligemma.py",
           "full = additive_mask((key_valid & (ki <= q))[:, None, None, :])",
           "full = additive_mask((key_valid & (ki <= q + 1))[:, None, None, :])",
           k("tests/test_inputs.py", "decode_masks")),
    Mutant("image features merged into the slots in reverse order", "npvlm/models/paligemma.py",
           "xp.where(image_slot >= 0, image_slot, 0)", "xp.where(image_slot >= 0, N - 1 - image_slot, 0)",
           k("tests/test_inputs.py", "image_features")),
    Mutant("image features of image 0 merged into every row", "npvlm/models/paligemma.py",
           "rows = xp.reshape(xp.arange(B, dtype=image_slot.dtype), (B, 1)) * N + ",
           "rows = xp.reshape(xp.arange(B, dtype=image_slot.dtype), (B, 1)) * 0 + ",
           k("tests/test_inputs.py", "image_features")),
    Mutant("positions 0-indexed instead of 1-indexed", "npvlm/models/paligemma_inputs.py",
           'out["positions"].append([1] * pad + list(range(1, len(ids) + 1)))',
           'out["positions"].append([0] * pad + list(range(len(ids))))',
           k("tests/test_inputs.py", "layout_batch")),
    Mutant("decode steps keep the prompt's last position (RoPE position not advanced)", "npvlm/models/paligemma.py",
           "positions=state.positions + 1, cols=state.cols + 1", "positions=state.positions, cols=state.cols + 1",
           k("tests/test_generate.py", "test_greedy_32_tokens_equal_hf_one_at_a_time and numpy")),
    Mutant("safetensors: overlapping data_offsets accepted", "npvlm/io/safetensors_file.py",
           "        if b != end:\n", "        if b > end:\n",
           k("tests/test_weights.py", "overlapping")),
    Mutant("bf16 widened with the wrong shift", "npvlm/io/safetensors_file.py",
           "wide <<= 16", "wide <<= 15",
           k("tests/test_weights.py", "bf16_and_f16_widen")),
    Mutant("AdamW without its second-moment bias correction", "npvlm/train/optim.py",
           "bc2_sqrt = (1 - b2**t) ** 0.5", "bc2_sqrt = 1.0",
           k("tests/test_finetune.py", "equal_torch and adamw and all")),
    Mutant("LoRA's B gradient without the scale alpha / r", "npvlm/train/optim.py",
           "out[m + \".lora_B.weight\"] = s * (dw @ a.T)", "out[m + \".lora_B.weight\"] = dw @ a.T",
           k("tests/test_finetune.py", "equal_torch and lora")),
    Mutant("cosine lr schedule one step late (HF's lr of step t + 1 at step t)", "npvlm/train/schedule.py",
           "progress = float(step - warmup)", "progress = float(step + 1 - warmup)",
           k("tests/test_finetune_schedule.py", "equals_hf_get_schedule and cosine")),
    Mutant("Ctrl-C not held back while numpy imports", "npvlm/apps/start.py",
           "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\n", "",
           k("tests/test_newcomer.py", "inside_the_numpy")),
    Mutant("bf16 decode kernel skips each row's last weight", "backends/numba_kernels.py",
           "for k in range(xm.shape[0]):  # vectorised: 16", "for k in range(xm.shape[0] - 1):  # vectorised: 16",
           ("tests/test_kernels.py", "-k", "packed_linear_equals")),
    Mutant("bf16 four-row decode kernel reads its third row shifted by one", "backends/numba_kernels.py",
           "s2 += xk * _bf16(w2[k])", "s2 += xk * _bf16(w2[(k + 1) % K])",
           ("tests/test_kernels.py", "-k", "packed_linear_equals")),
    Mutant("bf16 four-row decode kernel reads the rows past the last four one row early", "backends/numba_kernels.py",
           "out[m, r] = _dot_bf16(x[m], bits[r])", "out[m, r] = _dot_bf16(x[m], bits[r - 1])",
           ("tests/test_kernels.py", "-k", "packed_linear_equals")),
    Mutant("int8 decode kernel forgets the row's scale", "backends/numba_kernels.py",
           "out[m, n] *= sn", "out[m, n] *= 1.0",
           ("tests/test_kernels.py", "-k", "packed_linear_equals")),
    Mutant("int8 decode kernel keeps only a row's last segment", "backends/numba_kernels.py",
           "out[m, n] += s\n", "out[m, n] = s\n",
           ("tests/test_kernels.py", "-k", "packed_linear_equals")),
    Mutant("float32 decode kernel reads one row of each eight shifted by one", "backends/numba_kernels.py",
           "s3 += xk * w3[k]\n", "s3 += xk * w3[(k + 1) % K]\n",
           ("tests/test_dense_kernel.py", "-k", "equals_float32")),
    Mutant("float32 decode kernel reads the rows past the last eight one row early", "backends/numba_kernels.py",
           "out[m, r] = _dot_f32(x[m], w[r])", "out[m, r] = _dot_f32(x[m], w[r - 1])",
           ("tests/test_dense_kernel.py", "-k", "equals_float32")),
    Mutant("numba GELU with a wrong cubic constant", "backends/numba_elementwise.py",
           "(v + np.float32(0.044715) * (v * v * v))", "(v + np.float32(0.047715) * (v * v * v))",
           ("tests/test_numba_elementwise.py",)),
    Mutant("numba GELU's exponential drops its r^5 / 120 term", "backends/numba_elementwise.py",
           "    p = p * r + np.float32(1.0 / 120)\n", "    p = p * r\n",
           ("tests/test_numba_elementwise.py",)),
    Mutant("numba GELU never saturates as the reference's tanh does", "backends/numba_elementwise.py",
           "out[i] = v * np.float32(0.0) if y > _Y_SAT else g", "out[i] = g",
           ("tests/test_numba_elementwise.py",)),
    Mutant("numba GELU takes decode-sized inputs too", "backends/numba_elementwise.py",
           "and x.size >= PARALLEL_MIN)", ")",
           ("tests/test_numba_elementwise.py",)),
    Mutant("the backend loads numba but not its GELU", "backends/numpy_backend.py",
           "        register_numba_elementwise()  # GELU", "        pass  # GELU",
           ("tests/test_numba_elementwise.py",)),
    Mutant("prefill's last layer rotates the last query by the first position's angles", "npvlm/models/gemma.py",
           "x[:, -1:, :], cos[:, -1:, :], sin[:, -1:, :]", "x[:, -1:, :], cos[:, :1, :], sin[:, :1, :]",
           ("tests/test_generate.py", "-k", "prefill_logits")),
    Mutant("decode steps keep every BLAS thread beside numba's kernels", "npvlm/generation/generate.py",
           "            with backend.decoding():", "            if True:",
           ("tests/test_dense_kernel.py", "-k", "one_blas_thread")),
    Mutant("the dense calibration times the vision tower's weights", "backends/numpy_backend.py",
           'name.startswith("language_model.")', 'name.startswith("vision_tower.")',
           ("tests/test_dense_kernel.py", "-k", "own_decode_weights")),
    Mutant("the dense calibration times the head first", "backends/numpy_backend.py",
           'sorted(names, key=lambda n: "embed_tokens" in n)', "names",
           ("tests/test_dense_kernel.py", "-k", "own_decode_weights")),
    Mutant("the dense calibration ignores its margin", "backends/numba_kernels.py",
           "_DENSE_WINS = best[\"loop\"] <= margin * best[\"blas\"]", "_DENSE_WINS = True",
           ("tests/test_dense_kernel.py", "-k", "calibration or keeps_blas")),
]


def scratch_copy(dest: str) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in COPIED:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name), ignore=ignore)
        elif os.path.isfile(src):
            shutil.copy2(src, os.path.join(dest, name))


def apply(root: str, m: Mutant) -> None:
    path = os.path.join(root, m.path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    n = text.count(m.original)
    if n != 1:
        raise SystemExit(f"mutate: mutant {m.name!r}: its original text occurs {n} times in {m.path} "
                         f"(expected exactly once; the code moved, update the mutant):\n{m.original}")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(m.original, m.replacement))


def killer(output: str) -> str:
    """The first failing test named in pytest's -q summary (or the last line when none is)."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0]
    tail = [line for line in output.splitlines() if line.strip()]
    return tail[-1] if tail else "(no output)"


def run(m: Mutant, python: str) -> tuple[bool, str, float]:
    """-> (killed, by what, seconds)."""
    with tempfile.TemporaryDirectory(prefix="npvlm-mutant-") as root:
        scratch_copy(root)
        apply(root, m)
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=root, PYTHONDONTWRITEBYTECODE="1")
        cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            return True, f"timeout after {TIMEOUT} s", time.perf_counter() - t0
        seconds = time.perf_counter() - t0
        out = p.stdout + p.stderr
        if p.returncode == 5:  # pytest: no test collected (a -k that matches nothing)
            raise SystemExit(f"mutate: mutant {m.name!r}: its selection {' '.join(m.tests)} ran no test:\n{out[-2000:]}")
        return p.returncode != 0, killer(out) if p.returncode != 0 else "", seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("only", nargs="*", help="run only the mutants whose name contains one of these words")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or any(w.lower() in m.name.lower() for w in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name}  [{m.path}]  tests: {' '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory() as root:  # every original must be found once before any run starts
        scratch_copy(root)
        for m in chosen:
            with open(os.path.join(root, m.path), encoding="utf-8") as f:
                if f.read().count(m.original) != 1:
                    apply(root, m)  # raises, naming the mutant and the count
    survivors, t_all = [], time.perf_counter()
    for m in chosen:
        killed, by, seconds = run(m, args.python)
        print(f"{'killed  ' if killed else 'SURVIVED'}  {seconds:6.1f} s  {m.name}" + (f"  <- {by}" if killed else ""),
              flush=True)
        if not killed:
            survivors.append(m.name)
    print(f"killed {len(chosen) - len(survivors)}/{len(chosen)} in {time.perf_counter() - t_all:.0f} s"
          + (f"; survived: {'; '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
