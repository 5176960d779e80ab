#!/usr/bin/env python3
"""Decode-speed benchmark of stock llama.cpp (llama-cpp-python) on a GGUF.

Usage:
  python3 scripts/llamacpp_bench.py --model P --tokens N --threads T --prompt-ids 1,2,3

Evaluates the prompt (untimed), then times N greedy single-token decode steps (eval one token,
argmax of its logits). Prints one JSON line to stdout:
  {"decode_tok_s": x, "threads": T, "tokens": N, ...}
Called by `equicrypt bench --llamacpp`, which reads `decode_tok_s`.
"""

import argparse
import sys
import time

import numpy as np

import llamacpp_common as lc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-ids", default="", help="comma-separated token ids")
    a = ap.parse_args()

    prompt = lc.parse_ids(a.prompt_ids)
    n_tokens = max(1, a.tokens)
    llm = lc.load(a.model, a.threads, max(512, len(prompt) + n_tokens + 8), False)
    if not prompt:
        bos = llm.token_bos()
        prompt = [bos if bos >= 0 else 0]
    nv = lc.n_vocab(llm)
    bad = [t for t in prompt if not 0 <= t < nv]
    if bad:
        lc.log(f"error: prompt id(s) outside the vocabulary (size {nv}): {bad[:5]}")
        return 2

    t0 = time.perf_counter()
    llm.eval(prompt)
    t_prompt = time.perf_counter() - t0
    tok = int(np.argmax(lc.last_logits(llm)))

    t0 = time.perf_counter()
    for _ in range(n_tokens):
        llm.eval([tok])
        tok = int(np.argmax(lc.last_logits(llm)))
    dt = time.perf_counter() - t0

    rate = n_tokens / dt
    lc.log(f"prompt {len(prompt)} tok in {t_prompt:.3f}s; decode {n_tokens} tok in {dt:.3f}s "
           f"= {rate:.2f} tok/s")
    lc.dump({
        "decode_tok_s": rate,
        "threads": a.threads,
        "tokens": n_tokens,
        "prompt_tokens": len(prompt),
        "prompt_s": t_prompt,
        "engine": "llama.cpp " + lc.llama_version(),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
