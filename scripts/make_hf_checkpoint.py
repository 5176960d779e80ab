#!/usr/bin/env python3
"""Converts a GGUF into a Hugging Face transformers checkpoint directory, offline.

Usage: python make_hf_checkpoint.py MODEL.gguf OUT_DIR [--dtype bfloat16|float32]

transformers (5.x) reads the GGUF with `gguf_file=` (dequantizing Q4_1 and friends, undoing
llama.cpp's Q/K row reordering), then `save_pretrained` writes config.json, model.safetensors,
generation_config.json and the tokenizer files. The GGUF quantizer transformers attaches on load
is detached first (otherwise save_pretrained refuses). Writes into OUT_DIR.tmp and renames.
"""

import argparse
import os
import shutil
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


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
    os.replace(tmp, a.out)
    print(a.out)


if __name__ == "__main__":
    sys.exit(main())
