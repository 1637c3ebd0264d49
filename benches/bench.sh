#!/usr/bin/env bash
# kiln bench vs llama-bench (pp and tg), and kiln perplexity vs llama-perplexity tokens/s (whole process), side by
# side in the same run on the same machine with the same threads. Prints a Markdown table with the
# ratios kiln/llama (>1: kiln faster).
#
#   benches/bench.sh [-t THREADS] [-p 512] [-n 128] [-r 5] [MODEL.gguf... | TYPE...]
#
# With GGUF paths, those models are measured. Otherwise (default types F16 Q8_0 Q4_0 Q4_K_M Q6_K)
# the synthetic ~400M-parameter model (dim 2048, 4 layers, ffn 5504, vocab 55,296) is generated
# and quantized by kiln. Set PPL=0 to skip the perplexity columns (-c 512 on the shared zh text).
# Needs: python3 with numpy + gguf, and llama.cpp's tools (KILN_LLAMACPP_BIN, or built by
# scripts/llamacpp-tools.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=$(nproc); NP=512; NG=128; REPS=5
while getopts "t:p:n:r:" o; do
  case $o in t) THREADS=$OPTARG;; p) NP=$OPTARG;; n) NG=$OPTARG;; r) REPS=$OPTARG;; *) exit 2;; esac
done
shift $((OPTIND - 1))
ARGS=("$@"); [ ${#ARGS[@]} -gt 0 ] || ARGS=(F16 Q8_0 Q4_0 Q4_K_M Q6_K)
BIN=${KILN_LLAMACPP_BIN:-$(bash scripts/llamacpp-tools.sh)}
OUT=${BENCH_OUT:-bench-out}; mkdir -p "$OUT"
SHARED=${KILN_SHARED:-../shared}
TEXT=$SHARED/fixtures/texts/zh-libai.txt
# KILN=path/to/kiln to measure a given binary (default: a fresh release build)
# ROUNDS=N (default 1): kiln bench and llama-bench run alternately N times per model and each
# column keeps its best round (each round is already a mean of -r repetitions), so that a minute of
# background load on a shared machine does not decide a ratio
if [ -z "${KILN:-}" ]; then cargo build --release -q; KILN=target/release/kiln; fi
IN=$OUT/synth-400m.f16.gguf

models=()
for a in "${ARGS[@]}"; do
  if [[ $a == *.gguf ]]; then models+=("$a"); continue; fi
  [ -f "$IN" ] || python3 tests/interop/make_f16_gguf.py "$IN" --preset 400m \
    --vocab-from "$SHARED/fixtures/chinese-llama-2-tokenizer/tokenizer.model" >&2
  if [ "$a" = F16 ]; then models+=("$IN"); continue; fi
  q=$OUT/synth-400m.$a.gguf
  [ -f "$q" ] || "$KILN" quantize "$IN" "$q" "$a" "$THREADS" -q >&2
  models+=("$q")
done

# "pp_ts tg_ts" from a llama-bench or kiln bench JSON array
rates() { python3 -c '
import json, sys
d = json.load(sys.stdin)
pp = [t["avg_ts"] for t in d if t["n_prompt"] > 0 and t["n_gen"] == 0]
tg = [t["avg_ts"] for t in d if t["n_gen"] > 0 and t["n_prompt"] == 0]
print(pp[0] if pp else 0, tg[0] if tg else 0)'; }

max() { awk -v a="$1" -v b="$2" 'BEGIN { print (a+0 > b+0) ? a : b }'; }

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; threads: $THREADS"
echo "flags: $(grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512bw|avx512_vnni|fma|f16c)$' | tr '\n' ' ')"
echo "mean of $REPS repetitions; best of ${ROUNDS:-1} alternating rounds"
echo
echo "| model | kiln pp$NP t/s | llama pp$NP t/s | pp ratio | kiln tg$NG ms/tok | llama tg$NG ms/tok | tg ratio | kiln ppl t/s | llama ppl t/s | ppl ratio |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for m in "${models[@]}"; do
  kpp=0; ktg=0; lpp=0; ltg=0
  for _ in $(seq "${ROUNDS:-1}"); do
    read -r a b < <("$KILN" bench -m "$m" -p "$NP" -n "$NG" -r "$REPS" -t "$THREADS" --json -q | rates)
    kpp=$(max "$kpp" "$a"); ktg=$(max "$ktg" "$b")
    # --repack 0: the plain ggml-cpu kernels, as the interop tests run llama.cpp
    read -r a b < <("$BIN/llama-bench" -m "$m" -p "$NP" -n "$NG" -r "$REPS" -t "$THREADS" --repack 0 -o json 2>/dev/null | rates)
    lpp=$(max "$lpp" "$a"); ltg=$(max "$ltg" "$b")
  done
  kp=0; lp=0
  if [ "${PPL:-1}" != 0 ] && [ -f "$TEXT" ]; then
    # tokens evaluated / wall seconds of the whole process, the same way for both
    t0=$(date +%s.%N)
    n=$("$KILN" perplexity -m "$m" -f "$TEXT" -c 512 -t "$THREADS" --json -q 2>/dev/null |
      python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["n_chunk"] * d["n_ctx"])')
    t1=$(date +%s.%N)
    kp=$(awk -v n="$n" -v a="$t0" -v b="$t1" 'BEGIN { print n / (b - a) }')
    t0=$(date +%s.%N)
    n=$("$BIN/llama-perplexity" -m "$m" -f "$TEXT" -c 512 -t "$THREADS" -nr 2>&1 |
      sed -n 's/.*perplexity over \([0-9]*\) chunks, n_ctx=\([0-9]*\).*/\1 \2/p' | awk '{ print $1 * $2 }')
    t1=$(date +%s.%N)
    lp=$(awk -v n="$n" -v a="$t0" -v b="$t1" 'BEGIN { print n / (b - a) }')
  fi
  awk -v m="$(basename "$m")" -v kpp="$kpp" -v lpp="$lpp" -v ktg="$ktg" -v ltg="$ltg" -v kp="$kp" -v lp="${lp:-0}" '
    function r(a, b) { return b > 0 ? sprintf("%.2fx", a / b) : "-" }
    BEGIN { printf "| %s | %.1f | %.1f | %s | %.2f | %.2f | %s | %.1f | %.1f | %s |\n",
      m, kpp, lpp, r(kpp, lpp), (ktg > 0 ? 1000 / ktg : 0), (ltg > 0 ? 1000 / ltg : 0), r(ktg, ltg),
      kp, lp, r(kp, lp) }'
done
