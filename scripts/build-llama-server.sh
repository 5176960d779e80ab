#!/usr/bin/env bash
# Builds llama.cpp's HTTP server (`llama-server`) from the llama.cpp that llama-cpp-python 0.3.36
# vendors — the same llama.cpp the other llama.cpp checks use — and prints the binary's path on
# stdout (everything else goes to stderr).
#
# usage: scripts/build-llama-server.sh [CACHE_DIR]
#   CACHE_DIR defaults to $EQUICRYPT_CACHE_DIR, else /work/cache. Layout inside it:
#     src/llama_cpp_python-0.3.36.tar.gz   sdist (downloaded with pip when absent)
#     llama_cpp_python-0.3.36/             unpacked sources
#     llama-server-build/bin/llama-server  the binary (the tests look here)
#
# Idempotent: exits at once when the binary exists. Needs cmake, a C++17 compiler and pip.
# Build options: Release, static libs, no curl/OpenSSL, no web UI download (nothing is fetched at
# build time), GGML_NATIVE=ON (tuned to this CPU; set GGML_NATIVE=OFF for a portable binary).
# ~9 min with 2 jobs on the 2-core dev machine. JOBS overrides the parallelism.
#
# Serving an encrypted model: llama.cpp's AMX repack path crashes (segfault at warm-up) on CPUs
# with Intel AMX when a micro-batch has more than one token, so start the server with
# `--no-repack` (or `-ub 1`), e.g.
#   llama-server -m enc.gguf --host 127.0.0.1 --port 8090 -t 1 --no-repack --alias equicrypt-<fingerprint>
# and send only token-id prompts: the encrypted vocabulary has no byte tokens, so llama.cpp aborts
# when asked to tokenize text.
set -euo pipefail

VERSION=0.3.36
CACHE_DIR=${1:-${EQUICRYPT_CACHE_DIR:-/work/cache}}
JOBS=${JOBS:-2}
NATIVE=${GGML_NATIVE:-ON}

mkdir -p "$CACHE_DIR"
CACHE_DIR=$(cd "$CACHE_DIR" && pwd)
SDIST_DIR="$CACHE_DIR/src"
SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
SRC="$CACHE_DIR/llama_cpp_python-$VERSION"
BUILD="$CACHE_DIR/llama-server-build"
BIN="$BUILD/bin/llama-server"

if [ -x "$BIN" ]; then
    echo "llama-server already built" >&2
    echo "$BIN"
    exit 0
fi

for tool in cmake c++; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is required" >&2; exit 1; }
done

if [ ! -f "$SDIST" ]; then
    echo "== downloading the llama-cpp-python $VERSION sdist" >&2
    mkdir -p "$SDIST_DIR"
    python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SDIST_DIR" >&2
fi

if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
    echo "== unpacking $SDIST" >&2
    rm -rf "$SRC"
    tar xzf "$SDIST" -C "$CACHE_DIR"
fi

echo "== configuring llama.cpp (llama-server) in $BUILD" >&2
start=$(date +%s)
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE="$NATIVE" \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF >&2

echo "== building llama-server (-j $JOBS)" >&2
cmake --build "$BUILD" --config Release --target llama-server -j "$JOBS" >&2

if [ ! -x "$BIN" ]; then
    echo "error: build finished but $BIN is missing" >&2
    exit 1
fi
echo "== built in $(( $(date +%s) - start )) s" >&2
echo "$BIN"
