#!/usr/bin/env bash
# kiln imatrix vs llama-imatrix, side by side in the same run on the same machine, same threads.
# Synthetic F16 GGUF of ~400M parameters (dim 2048, 4 layers, ffn 5504, vocab 55,296); the
# calibration text is ../shared/fixtures/texts/zh-libai.txt repeated to give CHUNKS chunks of 512.
# Prints a Markdown row: wall seconds and peak RSS of both, the speed-up (llama/kiln, >1: kiln
# faster) and the largest relative difference between the two imatrix files.
#
#   benches/imatrix.sh [THREADS] [CHUNKS]
# Needs: python3 with numpy + gguf, /usr/bin/time, and llama.cpp's tools
# (KILN_LLAMACPP_BIN, or built by scripts/llamacpp-tools.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-$(nproc)}
CHUNKS=${2:-8}
BIN=${KILN_LLAMACPP_BIN:-$(bash scripts/llamacpp-tools.sh)}
OUT=${BENCH_OUT:-bench-out}; mkdir -p "$OUT"
SHARED=${KILN_SHARED:-../shared}; [ -d "$SHARED" ] || SHARED=../../shared
cargo build --release -q
KILN=target/release/kiln
IN=$OUT/synth-400m.f16.gguf
[ -f "$IN" ] || python3 tests/interop/make_f16_gguf.py "$IN" --preset 400m \
  --vocab-from $SHARED/fixtures/chinese-llama-2-tokenizer/tokenizer.model >&2
TEXT=$OUT/calib.txt
: > "$TEXT"
for _ in $(seq 1 $((CHUNKS / 3 + 2))); do cat "$SHARED/fixtures/texts/zh-libai.txt" >> "$TEXT"; done
measure() { # prints "wall_s peak_kb"
  /usr/bin/time -f "%e %M" -o "$OUT/time.txt" "$@" >/dev/null 2>"$OUT/err.txt" || { cat "$OUT/err.txt" >&2; exit 1; }
  cat "$OUT/time.txt"
}
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; threads: $THREADS"
echo
echo "| chunks x 512 | kiln s | llama-imatrix s | speed-up | kiln peak RSS MiB | llama peak RSS MiB | max rel diff |"
echo "|---|---:|---:|---:|---:|---:|---:|"
sync; read -r kw km < <(measure "$KILN" imatrix -m "$IN" -f "$TEXT" -o "$OUT/k.imatrix.gguf" \
  -c 512 --chunks "$CHUNKS" -t "$THREADS" -q)
sync; read -r lw lm < <(measure "$BIN/llama-imatrix" -m "$IN" -f "$TEXT" -o "$OUT/l.imatrix.gguf" \
  -c 512 --chunks "$CHUNKS" -t "$THREADS")
diff=$(python3 - "$OUT/k.imatrix.gguf" "$OUT/l.imatrix.gguf" <<'PY'
import sys
import numpy as np
from gguf import GGUFReader
a, b = (
    {t.name: np.array(t.data, dtype=np.float64).ravel() for t in GGUFReader(p).tensors}
    for p in sys.argv[1:3]
)
assert sorted(a) == sorted(b), "different entries"
print(f"{max(float(np.max(np.abs(a[n] - b[n]) / np.abs(b[n]))) for n in a):.1e}")
PY
)
awk -v c="$CHUNKS" -v kw="$kw" -v lw="$lw" -v km="$km" -v lm="$lm" -v d="$diff" \
  'BEGIN { printf "| %s | %.2f | %.2f | %.2fx | %.0f | %.0f | %s |\n", c, kw, lw, lw/kw, km/1024, lm/1024, d }'
