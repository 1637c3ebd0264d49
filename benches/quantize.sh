#!/usr/bin/env bash
# kiln quantize vs llama-quantize, side by side in the same run on the same machine, same threads.
# Synthetic F16 GGUF of ~400M parameters (dim 2048, 4 layers, ffn 5504, vocab 55,296).
# Prints a Markdown table: wall seconds and peak RSS of both, and the ratio llama/kiln (>1: kiln faster).
#
#   benches/quantize.sh [THREADS] [TYPES...]
# Needs: python3 with numpy + gguf, /usr/bin/time, and llama.cpp's tools
# (KILN_LLAMACPP_BIN, or built by scripts/llamacpp-tools.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-$(nproc)}; shift || true
TYPES=("$@"); [ ${#TYPES[@]} -gt 0 ] || TYPES=(Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K F16 BF16)
BIN=${KILN_LLAMACPP_BIN:-$(bash scripts/llamacpp-tools.sh)}
OUT=${BENCH_OUT:-bench-out}; mkdir -p "$OUT"
cargo build --release -q
KILN=target/release/kiln
IN=$OUT/synth-400m.f16.gguf
[ -f "$IN" ] || python3 tests/interop/make_f16_gguf.py "$IN" --preset 400m \
  --vocab-from ../shared/fixtures/chinese-llama-2-tokenizer/tokenizer.model >&2
measure() { # prints "wall_s peak_kb"
  /usr/bin/time -f "%e %M" -o "$OUT/time.txt" "$@" >/dev/null 2>"$OUT/err.txt" || { cat "$OUT/err.txt" >&2; exit 1; }
  cat "$OUT/time.txt"
}
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; threads: $THREADS"
echo "flags: $(grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512bw|fma|f16c)$' | tr '\n' ' ')"
echo
echo "| type | kiln s | llama-quantize s | speed-up | kiln peak RSS MiB | llama peak RSS MiB |"
echo "|---|---:|---:|---:|---:|---:|"
# One unmeasured pair first: the first large write of a run pays for reclaiming page cache left by
# earlier work, whichever tool goes first.
"$KILN" quantize "$IN" "$OUT/k.gguf" "${TYPES[0]}" "$THREADS" -q >/dev/null 2>&1 || true
"$BIN/llama-quantize" "$IN" "$OUT/l.gguf" "${TYPES[0]}" "$THREADS" >/dev/null 2>&1 || true
rm -f "$OUT/k.gguf" "$OUT/l.gguf"
for t in "${TYPES[@]}"; do
  sync; read -r kw km < <(measure "$KILN" quantize "$IN" "$OUT/k.gguf" "$t" "$THREADS" -q)
  sync; read -r lw lm < <(measure "$BIN/llama-quantize" "$IN" "$OUT/l.gguf" "$t" "$THREADS")
  python3 tests/interop/compare_gguf.py "$OUT/k.gguf" "$OUT/l.gguf" >/dev/null || echo "MISMATCH $t" >&2
  awk -v t="$t" -v kw="$kw" -v lw="$lw" -v km="$km" -v lm="$lm" \
    'BEGIN { printf "| %s | %.2f | %.2f | %.2fx | %.0f | %.0f |\n", t, kw, lw, lw/kw, km/1024, lm/1024 }'
  rm -f "$OUT/k.gguf" "$OUT/l.gguf"
done
