"""Shared helpers for the llama.cpp (llama-cpp-python) scripts of equicrypt.

Loading policy (why n_ubatch defaults to 1)
-------------------------------------------
On CPUs with Intel AMX (this build machine: Sapphire-Rapids class, `amx_int8`/`amx_tile`), llama.cpp
places Q4_1/Q8_0 weights in the AMX "extra" buffer type (weight repacking). Any micro-batch of more
than one token then runs `ggml_backend_amx_mul_mat`, which segfaults in llama-cpp-python 0.3.36
(observed with gdb: SIGSEGV in ggml_backend_amx_mul_mat). Single-token micro-batches take the
vector path and work. Two ways out:

* n_ubatch = 1 (default here): stock kernels and weight layout, bit-deterministic run to run;
  prefill is slower (one token per graph) but still ~100 tok/s on one thread for SmolLM2-135M.
* use_extra_bufts = False (`--no-repack`, forced automatically when --ubatch > 1 on an AMX CPU):
  plain ggml CPU kernels, batched prefill works, but decode is ~40 % slower on this machine and
  the logits then depend on the micro-batch size (not bit-identical to n_ubatch = 1).

All helpers print progress to stderr only; stdout is reserved for the JSON result.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time

import numpy as np


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        pass
    return False


def add_load_args(p) -> None:
    """Adds --ubatch / --no-repack to an argparse parser."""
    p.add_argument(
        "--ubatch",
        type=int,
        default=int(os.environ.get("EQUICRYPT_LLAMACPP_UBATCH", "1")),
        help="llama.cpp n_ubatch (default 1: larger micro-batches crash the AMX kernels of "
        "llama-cpp-python 0.3.36 on AMX CPUs; >1 on such a CPU implies --no-repack)",
    )
    p.add_argument(
        "--no-repack",
        action="store_true",
        help="disable llama.cpp extra buffer types (weight repacking, AMX)",
    )


def llama_version() -> str:
    import llama_cpp

    return getattr(llama_cpp, "__version__", "unknown")


def load(path: str, threads: int, n_ctx: int, logits_all: bool, ubatch: int = 1,
         no_repack: bool = False):
    """Loads a GGUF with llama-cpp-python, quietly, with the policy described above."""
    import llama_cpp.llama_cpp as C

    ubatch = max(1, int(ubatch))
    if ubatch > 1 and not no_repack and _cpu_has_amx():
        log("note: --ubatch > 1 on an AMX CPU: disabling weight repacking (AMX kernels crash)")
        no_repack = True

    orig = C.llama_model_default_params
    if no_repack:
        def patched():
            p = orig()
            p.use_extra_bufts = False
            return p

        C.llama_model_default_params = patched
    try:
        from llama_cpp import Llama

        t0 = time.perf_counter()
        llm = Llama(
            model_path=path,
            n_ctx=n_ctx,
            n_batch=max(ubatch, min(512, n_ctx)),
            n_ubatch=ubatch,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=logits_all,
            n_gpu_layers=0,
            verbose=False,
        )
        log(f"loaded {path} in {time.perf_counter() - t0:.2f}s "
            f"(n_ctx={n_ctx}, n_ubatch={ubatch}, repack={'off' if no_repack else 'on'}, "
            f"threads={threads})")
    finally:
        C.llama_model_default_params = orig
    return llm


def n_vocab(llm) -> int:
    return int(llm.n_vocab())


def last_logits(llm) -> np.ndarray:
    """A float32 view (no copy) of the logits of the last evaluated token."""
    import llama_cpp.llama_cpp as C

    ptr = C.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab(llm),))


def vocab_ptr(llm):
    import llama_cpp.llama_cpp as C

    return C.llama_model_get_vocab(llm._model.model)


def is_eog(llm, tok: int) -> bool:
    """llama.cpp's own end-of-generation test for `tok` (uses the model's vocabulary metadata)."""
    import llama_cpp.llama_cpp as C

    return bool(C.llama_vocab_is_eog(vocab_ptr(llm), int(tok)))


def greedy(llm, prompt, max_tokens: int, stop=None, use_model_eog: bool = False):
    """Greedy decoding from `prompt` (a fresh sequence). Returns (tokens, stop_token_or_None).

    Stops when the argmax is in `stop` (a set of ids) or, with `use_model_eog`, when llama.cpp
    says it is end-of-generation; the stop token is not included in the output.
    """
    stop = set(int(s) for s in (stop or ()))
    llm.reset()
    llm.eval(list(int(t) for t in prompt))
    out = []
    for _ in range(max_tokens):
        tok = int(np.argmax(last_logits(llm)))
        if tok in stop or (use_model_eog and is_eog(llm, tok)):
            return out, tok
        out.append(tok)
        if len(out) == max_tokens:
            break
        llm.eval([tok])
    return out, None


def dump(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def parse_ids(s: str):
    s = (s or "").strip()
    if not s:
        return []
    return [int(x) for x in s.replace(" ", ",").split(",") if x != ""]
