#!/usr/bin/env python3
"""Plaintext vs encrypted model, both run by stock llama.cpp (llama-cpp-python).

Usage:
  python3 scripts/llamacpp_eval.py --plain P.gguf --encrypted E.gguf --job JOB.json [--threads T]

JOB.json (written by `equicrypt verify --engine llamacpp`):
  {"ids": [...plaintext ids of the eval text], "cipher_ids": [...the same, encrypted],
   "perm": [perm[plain_id] = cipher_id, len = vocab],
   "prompts": [{"ids": [...], "cipher_ids": [...]}, ...],
   "gen_tokens": 32, "stop_plain": [...], "stop_cipher": [...], "threads": T}

Prints one JSON object to stdout:
  {"engine": "llama.cpp <version>", "engine_build": "<llama_print_system_info>",
   "logits": {"tokens", "bit_identical_rows", "max_abs_logit_diff", "top1_agreement",
              "mean_kl", "max_kl", "perplexity_plain", "perplexity_encrypted"},
   "generation": {"prompts", "identical", "token_agreement", "sample_answer"}}

Encrypted logit rows are mapped back with dec[p] = enc_row[perm[p]]. KL(plain || encrypted) is
computed per position in float64 from log-softmax. Perplexity = exp(mean NLL of the true next
token) over positions that have one. Generation is greedy; a stop id ends it and is not included.
The text is evaluated in independent chunks of at most --n-ctx tokens (one chunk when it fits).
Progress goes to stderr.
"""

import argparse
import json
import sys
import time

import numpy as np

import llamacpp_common as lc
from eval_metrics import compare_generations, logit_metrics


def text_logits(llm, ids, chunk):
    """Logit rows (float32, [len(ids), vocab]) of every position, in chunks of `chunk` tokens."""
    nv = lc.n_vocab(llm)
    out = np.empty((len(ids), nv), dtype=np.float32)
    for s in range(0, len(ids), chunk):
        part = ids[s:s + chunk]
        t0 = time.perf_counter()
        llm.reset()
        llm.eval(part)
        out[s:s + len(part)] = llm.scores[:len(part)]
        lc.log(f"  text chunk {s}..{s + len(part)}: {len(part) / (time.perf_counter() - t0):.1f} tok/s")
    return out


def generate_all(llm, prompts, key, gen_tokens, stop, label):
    outs = []
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        toks, _ = lc.greedy(llm, p[key], gen_tokens, stop=stop)
        outs.append(toks)
    lc.log(f"  {label}: {len(prompts)} prompts generated in {time.perf_counter() - t0:.1f}s")
    return outs


def main() -> int:
    ap = argparse.ArgumentParser(description="plaintext vs encrypted model in stock llama.cpp")
    ap.add_argument("--plain", required=True)
    ap.add_argument("--encrypted", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--threads", type=int, default=None, help="overrides the job's threads")
    ap.add_argument("--n-ctx", type=int, default=2048)
    a = ap.parse_args()

    with open(a.job, "r", encoding="utf-8") as f:
        job = json.load(f)
    ids = [int(t) for t in job["ids"]]
    cipher_ids = [int(t) for t in job["cipher_ids"]]
    perm = np.asarray(job["perm"], dtype=np.int64)
    prompts = job.get("prompts", [])
    gen_tokens = int(job.get("gen_tokens", 32))
    stop_plain = [int(t) for t in job.get("stop_plain", [])]
    stop_cipher = [int(t) for t in job.get("stop_cipher", [])]
    threads = a.threads if a.threads is not None else int(job.get("threads", 1))
    if len(ids) != len(cipher_ids):
        lc.log("error: ids and cipher_ids differ in length")
        return 2
    if np.any(perm[np.asarray(ids, dtype=np.int64)] != np.asarray(cipher_ids, dtype=np.int64)):
        lc.log("error: cipher_ids != perm[ids]")
        return 2
    if not np.array_equal(np.sort(perm), np.arange(len(perm))):
        lc.log("error: perm is not a permutation")
        return 2
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))

    max_prompt = max([len(p["ids"]) for p in prompts] + [0])
    n_ctx = max(a.n_ctx, max_prompt + gen_tokens + 8, 64)
    chunk = n_ctx - 1  # a fresh context per chunk; one chunk when len(ids) + 1 <= n_ctx

    lc.log(f"plaintext model: {len(ids)} text tokens, {len(prompts)} prompts")
    llm = lc.load(a.plain, threads, n_ctx, True)
    if lc.n_vocab(llm) != len(perm):
        lc.log(f"error: vocab {lc.n_vocab(llm)} != perm length {len(perm)}")
        return 2
    plain = text_logits(llm, ids, chunk)
    gen_plain = generate_all(llm, prompts, "ids", gen_tokens, stop_plain, "plain")
    del llm

    lc.log("encrypted model")
    llm = lc.load(a.encrypted, threads, n_ctx, True)
    if lc.n_vocab(llm) != len(perm):
        lc.log(f"error: encrypted vocab {lc.n_vocab(llm)} != perm length {len(perm)}")
        return 2
    enc = text_logits(llm, cipher_ids, chunk)
    gen_enc = generate_all(llm, prompts, "cipher_ids", gen_tokens, stop_cipher, "encrypted")
    del llm

    dec = np.ascontiguousarray(enc[:, perm])  # dec[:, p] = enc[:, perm[p]]
    del enc
    metrics = logit_metrics(plain, dec, ids)

    generation = compare_generations(gen_plain, gen_enc, inv)

    result = {
        "engine": "llama.cpp " + lc.llama_version(),
        "engine_build": lc.system_info(),
        "logits": metrics,
        "generation": generation,
    }
    lc.log(json.dumps(result, indent=1))
    lc.dump(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
