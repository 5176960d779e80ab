"""Sentence embeddings of a plaintext and an encrypted sentence-transformers checkpoint, computed
by stock sentence-transformers (on transformers, PyTorch CPU, float32) from token ids.

    $HF_PYTHON scripts/encoder_eval.py --plain DIR --encrypted DIR --input IDS.json --output OUT.json

IDS.json: {"plain_ids": [[...], ...], "cipher_ids": [[...], ...]} (one sequence per sentence,
special tokens included). The plaintext model embeds `plain_ids`, the encrypted model
`cipher_ids`; both through the checkpoint's own module pipeline (Transformer → Pooling →
Normalize), given the ids directly (the encrypted checkpoint's tokenizer is a placeholder).
OUT.json: {"plain": [[...]], "encrypted": [[...]], "versions": {...}}. The encrypted embeddings
are left encrypted: the caller, who holds the key, decrypts and compares.
"""

import argparse
import json

import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer


def embed(model, seqs):
    out = []
    with torch.no_grad():
        for ids in seqs:
            t = torch.tensor([ids], dtype=torch.long)
            feats = {"input_ids": t, "attention_mask": torch.ones_like(t),
                     "token_type_ids": torch.zeros_like(t)}
            out.append(model(feats)["sentence_embedding"][0].tolist())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plain", required=True)
    ap.add_argument("--encrypted", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    ids = json.load(open(a.input))
    plain = SentenceTransformer(a.plain, device="cpu").float().eval()
    enc = SentenceTransformer(a.encrypted, device="cpu").float().eval()
    result = {
        "plain": embed(plain, ids["plain_ids"]),
        "encrypted": embed(enc, ids["cipher_ids"]),
        "modules": [type(m).__name__ for m in enc],
        "versions": {"sentence_transformers": sentence_transformers.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__},
    }
    with open(a.output, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
