#!/usr/bin/env python3
"""Converts a GGUF into a Hugging Face transformers checkpoint directory, offline.

Usage: python make_hf_checkpoint.py MODEL.gguf OUT_DIR [--dtype bfloat16|float32]

transformers (5.x) reads the GGUF with `gguf_file=` (dequantizing Q4_1 and friends, undoing
llama.cpp's Q/K row reordering), then `save_pretrained` writes config.json, model.safetensors,
generation_config.json and the tokenizer files. The GGUF quantizer transformers attaches on load
is detached first (otherwise save_pretrained refuses). Writes into OUT_DIR.tmp and renames.

transformers 5.24's GGUF tokenizer conversion drops the `Digits(individual_digits)` step that
llama.cpp's `smollm` pre-tokenizer (and the original SmolLM2 tokenizer.json) applies before the
byte-level split, so "  99  " would tokenize differently from the GGUF; it is put back here.
"""

import argparse
import json
import os
import shutil
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def restore_digit_split(gguf_path, tokenizer_json):
    """Puts `Digits(individual_digits)` in front of the byte-level pre-tokenizer when the GGUF's
    pre-tokenizer is `smollm` (which splits every digit off) and the conversion lost it."""
    import gguf

    field = gguf.GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    pre = bytes(field.parts[field.data[0]]).decode() if field else ""
    if pre != "smollm":
        return
    with open(tokenizer_json, encoding="utf-8") as f:
        tj = json.load(f)
    if "Digits" in json.dumps(tj["pre_tokenizer"]):
        return
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, tj["pre_tokenizer"]]}
    with open(tokenizer_json, "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False, indent=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("out")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = ap.parse_args()
    d, f = os.path.split(os.path.abspath(a.gguf))
    dtype = getattr(torch, a.dtype)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = ""
    tmp = a.out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    restore_digit_split(os.path.abspath(a.gguf), os.path.join(tmp, "tokenizer.json"))
    os.replace(tmp, a.out)
    print(a.out)


if __name__ == "__main__":
    sys.exit(main())
