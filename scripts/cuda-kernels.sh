#!/usr/bin/env bash
# NVIDIA's CUDA 13.0 NVRTC, runtime headers and ptxas from PyPI wheels, for compiling kiln's CUDA
# kernels WITHOUT a GPU, a driver or a toolkit; prints the folder (lib/, include/, bin/).
#
# The wheels are the versions of the GPU machines' CUDA 13.0 (../shared/spec/gpu.md). They are
# fetched with `pip download --no-deps` into the cache and unzipped once; a second call returns at
# once. `--check` then runs the kernel-compile test (every kernel file through NVRTC for sm_80,
# sm_86, sm_89 and sm_90, each PTX through `ptxas -v`), which is what .ci/run does.
#
#   bash scripts/cuda-kernels.sh            # the folder
#   bash scripts/cuda-kernels.sh --check    # the folder, then the check
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
VER=13.0
ROOT=${KILN_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln-cuda}/$VER
WHEELS=(nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88
  nvidia-cuda-nvcc==13.0.88)
DIR=$ROOT/nvidia/cu13
ready() { [ -f "$ROOT/.complete" ] && [ -f "$DIR/lib/libnvrtc.so.13" ] && [ -x "$DIR/bin/ptxas" ] &&
  [ -f "$DIR/include/cuda_fp16.h" ]; }

if ! ready; then
  echo "fetching the CUDA $VER wheels (NVRTC, runtime headers, crt, nvcc) into $ROOT (once)" >&2
  rm -rf "$ROOT/unpack" "$DIR" "$ROOT/.complete"
  mkdir -p "$ROOT/wheels" "$ROOT/unpack"
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$ROOT/wheels" "${WHEELS[@]}" >&2
  for w in "${WHEELS[@]}"; do
    name=${w%%==*}
    file=$(ls "$ROOT/wheels/${name//-/_}-${w##*==}-"*.whl | head -n1)
    unzip -q -o "$file" -d "$ROOT/unpack" >&2
  done
  mkdir -p "$ROOT/nvidia"
  mv "$ROOT/unpack/nvidia/cu13" "$DIR"
  rm -rf "$ROOT/unpack"
  chmod +x "$DIR"/bin/* 2>/dev/null || true
  [ -f "$DIR/lib/libnvrtc.so.13" ] || { echo "libnvrtc.so.13 missing from the wheels in $DIR" >&2; exit 1; }
  [ -x "$DIR/bin/ptxas" ] || { echo "ptxas missing from the wheels in $DIR" >&2; exit 1; }
  [ -f "$DIR/include/cuda_fp16.h" ] || { echo "cuda_fp16.h missing from the wheels in $DIR" >&2; exit 1; }
  touch "$ROOT/.complete"
fi

if [ "${1:-}" = "--check" ]; then
  cd "$here/.."
  KILN_CUDA_WHEELS="$DIR" LD_LIBRARY_PATH="$DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    cargo test --test cuda_kernels -- --ignored --nocapture >&2
fi
echo "$DIR"
