#!/usr/bin/env bash
# Creates (once) the Python environment of the Hugging Face checks — transformers on PyTorch CPU —
# in $1 (default ${EQUICRYPT_CACHE_DIR:-/work/cache})/hf-venv, outside the repository, and prints
# its python (with sentence-transformers for the encoder checks). Versions are pinned; PyPI's torch wheel is the CUDA build (about 3 GB with its
# nvidia-* dependencies) and runs on the CPU without a GPU.
set -euo pipefail
cache="${1:-${EQUICRYPT_CACHE_DIR:-/work/cache}}"
venv="$cache/hf-venv"
pins=(torch==2.13.0 transformers==5.24.0 accelerate==1.15.0 gguf==0.19.0 safetensors==0.8.0
      tokenizers==0.23.3 numpy==2.4.6)
check='import torch, transformers, accelerate, gguf, safetensors, numpy
ok = (torch.__version__.split("+")[0] == "2.13.0" and transformers.__version__ == "5.24.0"
      and accelerate.__version__ == "1.15.0")
raise SystemExit(0 if ok else 1)'
# Added after the first pins: installed into an existing venv without rebuilding it.
# onnx, onnxruntime and pillow: the ONNX vision checks (scripts/export_ccexam.py, onnx_inputs.py,
# ort_run.py).
extras=(sentence-transformers==6.2.0 onnx==1.23.2 onnxruntime==1.32.0 pillow==13.0.0)
extras_check='import importlib.metadata as m
want = {"sentence-transformers": "6.2.0", "onnx": "1.23.2", "onnxruntime": "1.32.0", "pillow": "13.0.0"}
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None
raise SystemExit(0 if all(version(n) == v for n, v in want.items()) else 1)'
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" >/dev/null 2>&1; then
    if ! "$venv/bin/python" -c "$extras_check" >/dev/null 2>&1; then
        echo "adding ${extras[*]} to $venv…" >&2
        "$venv/bin/python" -m pip install --quiet "${extras[@]}" >&2
        "$venv/bin/python" -c "$extras_check"
    fi
    echo "$venv/bin/python"
    exit 0
fi
echo "setting up $venv (${pins[*]})…" >&2
rm -rf "$venv"
mkdir -p "$cache"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip setuptools >&2
"$venv/bin/python" -m pip install --quiet "${pins[@]}" "${extras[@]}" >&2
"$venv/bin/python" -c "$check"
"$venv/bin/python" -c "$extras_check"
echo "$venv/bin/python"
