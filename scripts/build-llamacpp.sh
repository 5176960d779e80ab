#!/usr/bin/env bash
# Builds llama.cpp — the independent stock engine of the test suite — portably, so that every x86
# host runs the same kernels: the llama-cpp-python binding (as a wheel, then installed) and
# llama.cpp's HTTP server `llama-server`, both from the llama.cpp that llama-cpp-python 0.3.36
# vendors, with one list of CMake flags. Prints the llama-server path on stdout (all else on stderr).
#
# usage: scripts/build-llamacpp.sh [CACHE_DIR]
#   CACHE_DIR defaults to $EQUICRYPT_CACHE_DIR, else /work/cache. Layout inside it:
#     src/llama_cpp_python-0.3.36.tar.gz        sdist (SHA-256 pinned below)
#     llama_cpp_python-0.3.36/                  unpacked sources
#     llamacpp-<flags hash>/wheel/*.whl         the binding, built with FLAGS
#     llamacpp-<flags hash>/server/bin/llama-server
#
# Portable build: GGML_NATIVE=OFF with AVX, AVX2, FMA, F16C and BMI2 on, AVX-512, AVX-VNNI and AMX
# off, one CPU backend (no runtime variant selection). An AMD Zen 4 and an Intel AMX machine then run
# the same AVX2 kernels (which also removes the AMX repack crash on micro-batches > 1). The binding is
# reinstalled whenever the installed one was built with other flags (checked through
# llama_print_system_info). Idempotent: a second run with the same flags builds nothing.
# ~10 min per part with 2 jobs on the 2-core dev machine; JOBS overrides the parallelism.
#
# Serving an encrypted model: send only token-id prompts (the encrypted vocabulary has no byte
# tokens, so llama.cpp aborts when asked to tokenize text), e.g.
#   llama-server -m enc.gguf --host 127.0.0.1 --port 8090 -t 1 --alias equicrypt-<fingerprint>
set -euo pipefail

VERSION=0.3.36
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
CACHE_DIR=${1:-${EQUICRYPT_CACHE_DIR:-/work/cache}}
JOBS=${JOBS:-2}

# The one list of flags both parts are built with. Changing it changes the cache key.
FLAGS="-DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF \
-DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF \
-DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
KEY=$(printf '%s %s' "$VERSION" "$FLAGS" | sha256sum | cut -c1-12)

mkdir -p "$CACHE_DIR"
CACHE_DIR=$(cd "$CACHE_DIR" && pwd)
SDIST="$CACHE_DIR/src/llama_cpp_python-$VERSION.tar.gz"
SRC="$CACHE_DIR/llama_cpp_python-$VERSION"
OUT="$CACHE_DIR/llamacpp-$KEY"
BIN="$OUT/server/bin/llama-server"

for tool in cmake c++ curl; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is required" >&2; exit 1; }
done

if [ ! -f "$SDIST" ] || ! echo "$SDIST_SHA256  $SDIST" | sha256sum --check --status; then
    echo "== downloading the llama-cpp-python $VERSION sdist" >&2
    mkdir -p "$(dirname "$SDIST")"
    url=$(curl -fsSL "https://pypi.org/simple/llama-cpp-python/" \
        | grep -o "https://[^\"#]*/llama_cpp_python-$VERSION.tar.gz" | head -n 1)
    [ -n "$url" ] || { echo "error: llama-cpp-python $VERSION sdist not on PyPI's index" >&2; exit 1; }
    curl -fsSL -o "$SDIST.tmp" "$url"
    echo "$SDIST_SHA256  $SDIST.tmp" | sha256sum --check --status \
        || { rm -f "$SDIST.tmp"; echo "error: sdist SHA-256 differs from the pinned $SDIST_SHA256" >&2; exit 1; }
    mv "$SDIST.tmp" "$SDIST"
fi
if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
    echo "== unpacking $SDIST" >&2
    rm -rf "$SRC"
    tar xzf "$SDIST" -C "$CACHE_DIR"
fi

# --- the Python binding -------------------------------------------------------------------------
# Portable iff the loaded library reports no AVX-512 and no AMX and does report AVX2.
binding_is_portable() {
    python3 - <<'PY' 2>/dev/null
import sys
import llama_cpp
info = llama_cpp.llama_print_system_info().decode()
flags = dict(f.strip().split(" = ") for part in info.split("|") for f in [part] if " = " in f)
bad = [k for k, v in flags.items() if v.strip() == "1" and (k.startswith("AVX512") or k.startswith("AMX") or k == "AVX_VNNI")]
sys.exit(0 if flags.get("AVX2", "0").strip() == "1" and not bad and llama_cpp.__version__ == "0.3.36" else 1)
PY
}
if binding_is_portable; then
    echo "llama-cpp-python: portable build already installed" >&2
else
    if ! ls "$OUT"/wheel/llama_cpp_python-*.whl >/dev/null 2>&1; then
        echo "== building the llama-cpp-python wheel (-j $JOBS)" >&2
        start=$(date +%s)
        rm -rf "$OUT/wheel.tmp"
        CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
            python3 -m pip wheel --quiet --no-deps --no-cache-dir "$SDIST" -w "$OUT/wheel.tmp" >&2
        rm -rf "$OUT/wheel" && mv "$OUT/wheel.tmp" "$OUT/wheel"
        echo "== wheel built in $(( $(date +%s) - start )) s" >&2
    fi
    echo "== installing the portable llama-cpp-python wheel" >&2
    python3 -m pip install --quiet --force-reinstall --no-deps "$OUT"/wheel/llama_cpp_python-*.whl >&2
    python3 -m pip install --quiet "$OUT"/wheel/llama_cpp_python-*.whl numpy >&2
    binding_is_portable || { echo "error: the installed llama-cpp-python is not the portable build" >&2; exit 1; }
fi

# --- llama-server ---------------------------------------------------------------------------------
if [ -x "$BIN" ]; then
    echo "llama-server: portable build already there" >&2
else
    echo "== configuring llama-server in $OUT/server" >&2
    start=$(date +%s)
    # shellcheck disable=SC2086 # FLAGS is a list of words
    cmake -S "$SRC/vendor/llama.cpp" -B "$OUT/server" \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF $FLAGS \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >&2
    echo "== building llama-server (-j $JOBS)" >&2
    cmake --build "$OUT/server" --config Release --target llama-server -j "$JOBS" >&2
    [ -x "$BIN" ] || { echo "error: build finished but $BIN is missing" >&2; exit 1; }
    echo "== llama-server built in $(( $(date +%s) - start )) s" >&2
fi
echo "$BIN"
