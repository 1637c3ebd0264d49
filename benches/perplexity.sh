#!/usr/bin/env bash
# kiln perplexity vs llama-perplexity, side by side on the same machine, same threads, run
# alternately (kiln, llama, llama -nr, kiln, ...) so that background load hits all alike.
# Synthetic F16 GGUF of ~400M parameters (dim 2048, 4 layers, ffn 5504, vocab 55,296), quantized by
# kiln to each type. Per type it prints:
#   - prompt processing tokens/s at -c CTX (best of REPS): kiln (tokens scored / wall of its
#     evaluation), llama-perplexity (-b n_ctx: one chunk per pass, as kiln) with its default
#     repacked weights and with -nr (no repack, the kernels kiln mirrors), each as
#     n_ctx / llama's "seconds per pass" (its first chunk);
#     ratios kiln/llama (> 1: kiln faster);
#   - single-token decode tokens/s: kiln perplexity -b 1 -c DCTX (one token per forward; only the
#     second half of each chunk computes logits) vs llama-bench tg DCTX (logits every token);
#   - peak RSS of the prompt runs (/usr/bin/time -v);
#   - both PPLs (llama -nr) and their relative difference, and the difference to llama's default.
#
#   benches/perplexity.sh [THREADS] [TYPES...]
# Env: CTX (512), CHUNKS (2), REPS (2), DCTX (64). Needs python3 with numpy + gguf, /usr/bin/time
# and llama.cpp's tools (KILN_LLAMACPP_BIN, or built by scripts/llamacpp-tools.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-$(nproc)}; shift || true
TYPES=("$@"); [ ${#TYPES[@]} -gt 0 ] || TYPES=(F16 Q8_0 Q4_0 Q4_K_M Q6_K)
CTX=${CTX:-512}; CHUNKS=${CHUNKS:-2}; REPS=${REPS:-2}; DCTX=${DCTX:-64}
BIN=${KILN_LLAMACPP_BIN:-$(bash scripts/llamacpp-tools.sh)}
OUT=${BENCH_OUT:-bench-out}; mkdir -p "$OUT"
cargo build --release -q
KILN=target/release/kiln
SHARED=${KILN_SHARED:-../shared}; [ -d "$SHARED" ] || SHARED=/work/shared
TEXT=${TEXT:-$SHARED/fixtures/texts/zh-libai.txt}
IN=$OUT/synth-400m.f16.gguf
[ -f "$IN" ] || python3 tests/interop/make_f16_gguf.py "$IN" --preset 400m \
  --vocab-from "$SHARED/fixtures/chinese-llama-2-tokenizer/tokenizer.model" >&2

# run CMD...: stdout+stderr to $OUT/log.txt, "wall_s peak_kb" to $OUT/time.txt
run() { /usr/bin/time -f "%e %M" -o "$OUT/time.txt" "$@" >"$OUT/log.txt" 2>&1 || { cat "$OUT/log.txt" >&2; exit 1; }; }
ppl() { sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p' "$OUT/log.txt" | head -1; }
kiln_tps() { sed -n 's/.*tokens in .* s (\([0-9.]*\) tokens\/s).*/\1/p' "$OUT/log.txt" | tail -1; }
# llama-perplexity times its first pass (one chunk of n_ctx tokens): "N seconds per pass"
llama_tps() { sed -n 's/.*perplexity: \([0-9.]*\) seconds per pass.*/\1/p' "$OUT/log.txt" | head -1 | awk -v c="$CTX" '{ printf "%.2f", c/$1 }'; }
rss() { awk '{ printf "%.0f", $2/1024 }' "$OUT/time.txt"; }
max() { awk -v a="$1" -v b="$2" 'BEGIN { print (a+0 > b+0) ? a : b }'; }

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; threads: $THREADS; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "prompt: -c $CTX --chunks $CHUNKS (best of $REPS); decode: kiln -b 1 -c $DCTX vs llama-bench -n $DCTX"
echo
echo "| type | kiln pp t/s | llama pp t/s | llama -nr pp t/s | kiln/llama | kiln/llama -nr | kiln tg t/s | llama tg t/s | tg ratio | kiln RSS MiB | llama RSS MiB | kiln PPL | llama -nr PPL | rel diff | rel diff vs llama default |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for t in "${TYPES[@]}"; do
  M=$OUT/synth-400m.$t.gguf
  if [ "$t" = F16 ]; then M=$IN; elif [ ! -f "$M" ]; then "$KILN" quantize "$IN" "$M" "$t" -q; fi
  kp=0; lp=0; np=0
  for _ in $(seq "$REPS"); do
    run "$KILN" perplexity -m "$M" -f "$TEXT" -c "$CTX" --chunks "$CHUNKS" -t "$THREADS" -q
    kp=$(max "$kp" "$(kiln_tps)"); kppl=$(ppl); krss=$(rss)
    run "$BIN/llama-perplexity" -m "$M" -f "$TEXT" -c "$CTX" -b "$CTX" --chunks "$CHUNKS" -t "$THREADS"
    lp=$(max "$lp" "$(llama_tps)"); dppl=$(ppl); lrss=$(rss)
    run "$BIN/llama-perplexity" -m "$M" -f "$TEXT" -c "$CTX" -b "$CTX" --chunks "$CHUNKS" -t "$THREADS" -nr
    np=$(max "$np" "$(llama_tps)"); lppl=$(ppl)
  done
  run "$KILN" perplexity -m "$M" -f "$TEXT" -c "$DCTX" -b 1 --chunks 1 -t "$THREADS" -q
  kg=$(kiln_tps)
  run "$BIN/llama-bench" -m "$M" -p 0 -n "$DCTX" -t "$THREADS" -r 1 -o csv
  lg=$(tail -1 "$OUT/log.txt" | awk -F'","' '{ print $(NF-1) }')
  awk -v t="$t" -v kp="$kp" -v lp="$lp" -v np="$np" -v kg="$kg" -v lg="$lg" -v kr="$krss" \
    -v lr="$lrss" -v k="$kppl" -v l="$lppl" -v d="$dppl" 'BEGIN {
      printf "| %s | %.1f | %.1f | %.1f | %.2fx | %.2fx | %.1f | %.1f | %.2fx | %s | %s | %s | %s | %.1e | %.1e |\n",
        t, kp, lp, np, kp/lp, kp/np, kg, lg, (lg > 0 ? kg/lg : 0), kr, lr, k, l, (k-l)/l, (k-d)/d }'
done
echo
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
