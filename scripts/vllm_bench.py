"""Decode speed of the encrypted vs the plaintext transformers checkpoint on stock vLLM, side by
side in one run.

    $VLLM_PYTHON scripts/vllm_bench.py --plain models/smollm2-hf --encrypted models/smollm2-hf-enc \
        [--rounds 5] [--tokens 128] [--json OUT]

Starts one vLLM server per checkpoint (float32, eager, no tokenizer), each pinned to its own CPU
core (VLLM_CPU_OMP_THREADS_BIND) so that they do not compete, then alternates plain / encrypted
requests: every round generates `--tokens` ids greedily with `ignore_eos` from the same 32-id
prompt (decode cost does not depend on which ids they are). Prints the median wall time of each
and the ratio encrypted ÷ plain. Needs two CPU cores.
"""

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model, core, log_dir):
    port = free_port()
    log = open(os.path.join(log_dir, f"vllm-{port}.log"), "w")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND=str(core),
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")
    p = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
         "--served-model-name", "m", "--skip-tokenizer-init", "--enforce-eager",
         "--dtype", "float32", "--max-model-len", "2048", "--host", "127.0.0.1",
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return p, port, log.name


def wait_healthy(p, port, log, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if p.poll() is not None:
            sys.exit(f"vLLM exited ({p.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"vLLM not healthy after {timeout} s; see {log}")


def generate(port, prompt, tokens):
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                       "ignore_eos": True, "return_token_ids": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.load(r)
    dt = time.perf_counter() - t
    n = len(out["choices"][0]["token_ids"])
    if n != tokens:
        sys.exit(f"expected {tokens} ids, got {n}")
    return dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plain", required=True)
    ap.add_argument("--encrypted", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json")
    a = ap.parse_args()
    log_dir = tempfile.mkdtemp(prefix="vllm-bench-")
    servers = [start(a.plain, 0, log_dir), start(a.encrypted, 1, log_dir)]
    try:
        for p, port, log in servers:
            wait_healthy(p, port, log)
        vocab = json.load(open(os.path.join(a.plain, "config.json")))["vocab_size"]
        prompt = random.Random(0).sample(range(vocab), 32)
        for _, port, _ in servers:  # warm-up
            generate(port, prompt, 8)
        times = {"plain": [], "encrypted": []}
        for _ in range(a.rounds):
            for name, (_, port, _) in zip(("plain", "encrypted"), servers):
                times[name].append(generate(port, prompt, a.tokens))
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "tokens": a.tokens, "rounds": a.rounds,
            "plain_tok_per_s": a.tokens / med["plain"],
            "encrypted_tok_per_s": a.tokens / med["encrypted"],
            "ratio_encrypted_over_plain_time": med["encrypted"] / med["plain"],
            "times": times,
        }
        print(f"plain     {result['plain_tok_per_s']:.1f} tok/s (median of {a.rounds})")
        print(f"encrypted {result['encrypted_tok_per_s']:.1f} tok/s")
        print(f"time ratio encrypted / plain: {result['ratio_encrypted_over_plain_time']:.3f}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        for p, _, _ in servers:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    main()
