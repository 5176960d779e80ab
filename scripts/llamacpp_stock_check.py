#!/usr/bin/env python3
"""Proves that *stock* llama.cpp (llama-cpp-python) loads an encrypted GGUF unchanged and answers
ciphertext-id prompts, stopping at the ciphertext EOS by its own end-of-generation logic.

Usage:
  python3 scripts/llamacpp_stock_check.py --encrypted E.gguf --prompt-cipher-ids 12,34,...
      [--key-fingerprint FP] [--max-tokens 64] [--threads T]
      [--plain P.gguf --plain-prompt-ids 1,2,...]

What it does, all with unmodified llama.cpp:
 1. loads E.gguf and reads its metadata (equicrypt.key_fingerprint / equicrypt.mode /
    tokenizer.ggml.model); with --key-fingerprint, checks it matches;
 2. lists the ids llama.cpp itself treats as end-of-generation (`llama_vocab_is_eog` over the whole
    vocabulary) and its EOS/BOS (`token_eos()` / `token_bos()`);
 3. greedy decoding loop on the ciphertext prompt ids (eval one token, argmax), stopping when
    `llama_vocab_is_eog` says so -> "cipher_output", "stopped_at_eos";
 4. the same through the stock high-level API `Llama.create_completion(prompt=[ids],
    temperature=0)` whose detokenized text is the placeholder tokens "<ct{id}>"; parsed back into
    ids and compared -> "completion";
 5. optionally the plaintext model on --plain-prompt-ids (same greedy loop, its own EOG)
    -> "plain_output", "plain_stopped_at_eos".
The caller (who holds the key) decrypts "cipher_output". One JSON object on stdout.
Exit status 0 even when the checks fail (the JSON says why); 2 on usage errors.
"""

import argparse
import re
import sys
import time

import llamacpp_common as lc

PLACEHOLDER = re.compile(r"<ct(\d+)>")


def main() -> int:
    ap = argparse.ArgumentParser(description="stock llama.cpp on an encrypted GGUF")
    ap.add_argument("--encrypted", required=True)
    ap.add_argument("--prompt-cipher-ids", required=True)
    ap.add_argument("--key-fingerprint", default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plain", default=None)
    ap.add_argument("--plain-prompt-ids", default=None)
    ap.add_argument("--no-completion", action="store_true",
                    help="skip the create_completion cross-check")
    a = ap.parse_args()

    prompt = lc.parse_ids(a.prompt_cipher_ids)
    if not prompt:
        lc.log("error: empty --prompt-cipher-ids")
        return 2
    n_ctx = max(512, len(prompt) + a.max_tokens + 8)
    res = {"engine": "llama.cpp " + lc.llama_version()}

    llm = lc.load(a.encrypted, a.threads, n_ctx, False)
    md = llm.metadata
    nv = lc.n_vocab(llm)
    res["vocab"] = nv
    res["metadata"] = {k: md.get(k) for k in (
        "equicrypt.key_fingerprint", "equicrypt.mode", "tokenizer.ggml.model",
        "tokenizer.ggml.add_bos_token", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.bos_token_id")}
    fp = md.get("equicrypt.key_fingerprint")
    res["fingerprint_ok"] = None if a.key_fingerprint is None else (fp == a.key_fingerprint)
    res["eos_id"] = int(llm.token_eos())
    res["bos_id"] = int(llm.token_bos())
    res["eog_ids"] = [i for i in range(nv) if lc.is_eog(llm, i)]
    bad = [t for t in prompt if not 0 <= t < nv]
    if bad:
        lc.log(f"error: prompt ids outside the vocabulary: {bad[:5]}")
        return 2

    t0 = time.perf_counter()
    out, stop = lc.greedy(llm, prompt, a.max_tokens, use_model_eog=True)
    dt = time.perf_counter() - t0
    res["cipher_output"] = out
    res["stopped_at_eos"] = stop is not None
    res["stop_id"] = stop
    lc.log(f"encrypted: {len(out)} tokens in {dt:.2f}s, stop id {stop}")

    if not a.no_completion:
        r = llm.create_completion(prompt=list(prompt), max_tokens=a.max_tokens,
                                  temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                  repeat_penalty=1.0)
        ch = r["choices"][0]
        text = ch["text"]
        ids = [int(m) for m in PLACEHOLDER.findall(text)]
        res["completion"] = {
            "finish_reason": ch.get("finish_reason"),
            "ids_match": ids == out,
            "text_is_placeholders": PLACEHOLDER.sub("", text) == "",
            "text_head": text[:80],
        }
    del llm

    if a.plain:
        pp = lc.parse_ids(a.plain_prompt_ids or "")
        if not pp:
            lc.log("error: --plain needs --plain-prompt-ids")
            return 2
        llm = lc.load(a.plain, a.threads, max(512, len(pp) + a.max_tokens + 8), False)
        pout, pstop = lc.greedy(llm, pp, a.max_tokens, use_model_eog=True)
        res["plain_output"] = pout
        res["plain_stopped_at_eos"] = pstop is not None
        res["plain_stop_id"] = pstop
        res["plain_text"] = llm.detokenize(pout).decode("utf-8", errors="replace")
        del llm

    lc.dump(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
