"""Shared helpers for the llama.cpp (llama-cpp-python) scripts of equicrypt.

Build and loading policy
------------------------
llama.cpp comes from `scripts/build-llamacpp.sh`: one portable build (AVX2/FMA/F16C, no AVX-512, no
AMX, no native tuning) so that an Intel and an AMD host run the same kernels. `load` refuses any
other build (see `system_info_is_portable`), so a test can never silently measure a host-tuned
library. Models load with llama.cpp's defaults (batched prefill, weight repacking on) and fixed
thread counts.

All helpers print progress to stderr only; stdout is reserved for the JSON result.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def system_info_is_portable(info: str) -> bool:
    """True for the portable build: AVX2 on, every AVX-512, AVX-VNNI and AMX feature off."""
    flags = {}
    for part in info.replace("|", "\n").splitlines():
        if " = " in part:
            k, v = part.rsplit(" = ", 1)
            flags[k.split(":")[-1].strip()] = v.strip()
    wide = [k for k, v in flags.items()
            if v == "1" and (k.startswith("AVX512") or k.startswith("AMX") or k == "AVX_VNNI")]
    return flags.get("AVX2") == "1" and not wide


def llama_version() -> str:
    import llama_cpp

    return getattr(llama_cpp, "__version__", "unknown")


def load(path: str, threads: int, n_ctx: int, logits_all: bool):
    """Loads a GGUF with llama-cpp-python, quietly, after checking the build is the portable one."""
    info = system_info()
    if not system_info_is_portable(info) and os.environ.get("EQUICRYPT_ALLOW_NATIVE_LLAMACPP") != "1":
        raise SystemExit(
            "error: llama-cpp-python is not the portable build (run scripts/build-llamacpp.sh); "
            f"system info: {info}")
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_batch=min(512, n_ctx),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        n_gpu_layers=0,
        verbose=False,
    )
    log(f"loaded {path} in {time.perf_counter() - t0:.2f}s (n_ctx={n_ctx}, threads={threads}; {info})")
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
