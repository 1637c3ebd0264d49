#!/usr/bin/env bash
# llama.cpp's reference tools built for interop tests and benchmarks WITHOUT AMX, printed as a folder.
#
# ../shared/tools/llamacpp-oracle.sh builds with -DGGML_NATIVE=ON; on CPUs that report AMX (Sapphire
# Rapids and later) inside sandboxes that do not grant AMX tile permission, its llama-perplexity,
# llama-bench and llama-imatrix die with SIGILL on quantized models. This script takes the same
# source (the oracle's --pack step fetches it) and builds it with explicit AVX2/AVX-512 flags instead.
# Cached beside the oracle's own builds; a second call returns at once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
oracle=${KILN_ORACLE_SCRIPT:-$here/../../shared/tools/llamacpp-oracle.sh}
VER=${LLAMACPP_PYTHON_VERSION:-0.3.36}
ROOT=${LLAMACPP_ORACLE_CACHE:-$HOME/.cache/llamacpp-oracle}/$VER
BIN=$ROOT/build-cpu-noamx/bin
TOOLS=(llama-quantize llama-perplexity llama-imatrix llama-tokenize llama-gguf-split llama-bench)
have_all() { for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || return 1; done; }
if have_all; then echo "$BIN"; exit 0; fi
[ -d "$ROOT/src" ] || bash "$oracle" --pack "$ROOT/src-pack.tar.xz" >&2
command -v cmake >/dev/null || python3 -m pip install -q cmake >&2
AVX512=OFF; grep -q avx512bw /proc/cpuinfo && AVX512=ON
echo "building llama.cpp tools without AMX into $BIN (several minutes, once)" >&2
cmake -S "$ROOT/src" -B "$ROOT/build-cpu-noamx" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF \
  -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=$AVX512 \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF >&2
cmake --build "$ROOT/build-cpu-noamx" -j"$(nproc)" --target "${TOOLS[@]}" >&2
have_all || { echo "llama.cpp tools missing after the build" >&2; exit 1; }
echo "$BIN"
