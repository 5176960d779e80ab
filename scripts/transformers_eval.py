#!/usr/bin/env python3
"""Plaintext vs encrypted Hugging Face checkpoint, both run by stock transformers (PyTorch CPU).

Usage:
  python scripts/transformers_eval.py --plain DIR --encrypted DIR --job JOB.json

JOB.json is the job `equicrypt verify` writes for every stock engine (see llamacpp_eval.py):
ids / cipher_ids of the evaluation text, perm (perm[plain_id] = cipher_id), prompts with their
ids and cipher_ids, gen_tokens, stop_plain, stop_cipher, threads. Both checkpoints are loaded with
`AutoModelForCausalLM.from_pretrained` unchanged, in float32 with eager attention (bf16 and fused
kernels flip near-ties; the comparison wants the engine's exact arithmetic, not its speed). Prints
one JSON object to stdout, as llamacpp_eval.py does.
"""

import argparse
import json
import sys
import time

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

from eval_metrics import compare_generations, logit_metrics


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def load(path):
    t0 = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    log(f"loaded {path} in {time.perf_counter() - t0:.1f}s")
    return m


@torch.inference_mode()
def text_logits(model, ids):
    out = model(torch.tensor([ids], dtype=torch.long)).logits[0]
    return out.float().numpy()


@torch.inference_mode()
def greedy(model, ids, n, stop):
    """Greedy continuation with a KV cache; a stop id ends it and is not included."""
    past = None
    x = torch.tensor([ids], dtype=torch.long)
    out = []
    for _ in range(n):
        r = model(x, past_key_values=past, use_cache=True)
        past = r.past_key_values
        t = int(r.logits[0, -1].argmax())
        if t in stop:
            break
        out.append(t)
        x = torch.tensor([[t]], dtype=torch.long)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plain", required=True)
    ap.add_argument("--encrypted", required=True)
    ap.add_argument("--job", required=True)
    a = ap.parse_args()
    with open(a.job, "r", encoding="utf-8") as f:
        job = json.load(f)
    torch.set_num_threads(int(job.get("threads", 1)))
    ids = [int(t) for t in job["ids"]]
    cipher_ids = [int(t) for t in job["cipher_ids"]]
    perm = np.asarray(job["perm"], dtype=np.int64)
    prompts = job.get("prompts", [])
    n = int(job.get("gen_tokens", 32))
    stop_plain = set(int(t) for t in job.get("stop_plain", []))
    stop_cipher = set(int(t) for t in job.get("stop_cipher", []))
    if np.any(perm[np.asarray(ids, dtype=np.int64)] != np.asarray(cipher_ids, dtype=np.int64)):
        log("error: cipher_ids != perm[ids]")
        return 2
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))

    model = load(a.plain)
    plain = text_logits(model, ids)
    gen_plain = [greedy(model, p["ids"], n, stop_plain) for p in prompts]
    del model
    model = load(a.encrypted)
    if model.config.vocab_size != len(perm):
        log(f"error: encrypted vocab {model.config.vocab_size} != perm length {len(perm)}")
        return 2
    enc = text_logits(model, cipher_ids)
    gen_enc = [greedy(model, p["cipher_ids"], n, stop_cipher) for p in prompts]
    del model
    dec = np.ascontiguousarray(enc[:, perm])
    result = {
        "engine": f"transformers {transformers.__version__} (torch {torch.__version__}, CPU, float32)",
        "engine_build": f"torch threads {torch.get_num_threads()}",
        "logits": logit_metrics(plain, dec, ids),
        "generation": compare_generations(gen_plain, gen_enc, inv),
    }
    log(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
