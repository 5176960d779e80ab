"""Plain-vs-encrypted comparison shared by the stock-engine checks (llama.cpp, transformers).

`logit_metrics(plain, dec, ids)`: `plain` and `dec` are float32 [positions, vocab] logit rows,
`dec` the encrypted model's rows mapped back to plaintext order (dec[:, p] = enc[:, perm[p]]).
KL(plain || encrypted) per position in float64 from log-softmax; perplexity = exp(mean NLL of the
true next token). `compare_generations(plain, enc, inv)`: greedy outputs (plaintext ids, and
ciphertext ids mapped back with `inv`), identical count and common-prefix token agreement.
"""

import math

import numpy as np


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def logit_metrics(plain, dec, ids):
    n = plain.shape[0]
    bit = int(np.all(plain.view(np.uint32) == dec.view(np.uint32), axis=1).sum())
    max_abs = float(np.abs(plain - dec).max()) if n else 0.0
    top1 = float(np.mean(plain.argmax(axis=1) == dec.argmax(axis=1))) if n else 1.0
    kls = np.empty(n, dtype=np.float64)
    nll_p = []
    nll_e = []
    step = 128  # bounded float64 temporaries
    for s in range(0, n, step):
        lp = log_softmax(plain[s:s + step])
        le = log_softmax(dec[s:s + step])
        kls[s:s + step] = (np.exp(lp) * (lp - le)).sum(axis=1)
        for i in range(lp.shape[0]):
            pos = s + i
            if pos + 1 < n:
                t = int(ids[pos + 1])
                nll_p.append(-lp[i, t])
                nll_e.append(-le[i, t])
    return {
        "tokens": n,
        "bit_identical_rows": bit,
        "max_abs_logit_diff": max_abs,
        "top1_agreement": top1,
        "mean_kl": float(kls.mean()) if n else 0.0,
        "max_kl": float(kls.max()) if n else 0.0,
        "perplexity_plain": float(math.exp(np.mean(nll_p))) if nll_p else float("nan"),
        "perplexity_encrypted": float(math.exp(np.mean(nll_e))) if nll_e else float("nan"),
    }


def compare_generations(gen_plain, gen_enc, inv):
    identical = 0
    common = 0
    total = 0
    for gp, ge in zip(gen_plain, gen_enc):
        ge_plain = [int(inv[t]) for t in ge]
        if gp == ge_plain:
            identical += 1
        k = 0
        while k < min(len(gp), len(ge_plain)) and gp[k] == ge_plain[k]:
            k += 1
        common += k
        total += max(len(gp), len(ge_plain))
    return {
        "prompts": len(gen_plain),
        "identical": identical,
        "token_agreement": (common / total) if total else 1.0,
        "sample_answer": "",
    }
