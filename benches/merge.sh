#!/usr/bin/env bash
# kiln merge on a Llama-2-7b-hf-shaped synthetic base (F16, dim 4096, 32 layers, ffn 11008, 32 heads,
# vocab 32,000, 2 safetensors shards, ~13.5 GB) + a Chinese-LLaMA-2-release-shaped LoRA (r=64, alpha 128,
# all seven projections, embed_tokens + lm_head at 55,296 rows, f16, ~1.23 GB), for --out and for
# --gguf --outtype q4_k_m, against `cat` baselines; wall and peak RSS from /usr/bin/time -f "%e %M".
#   benches/merge.sh [7b|3b]   (default 7b; 3b = dim 3200, 26 layers, ffn 8640 when under 40 GB are free)
#   SKIP_GGUF=1 benches/merge.sh 7b   (only the --out row and its baseline)
# Every run starts cold: `sync` and drop_caches (root only; otherwise the page cache is whatever it is).
# Baselines: --out against `cat BASE/*.safetensors LORA/adapter_model.safetensors > F` (reads every input,
# writes as many bytes, more than the merged folder's ~13.9 GB); --gguf against `cat INPUTS > /dev/null`
# then writing a file of the GGUF's size from /dev/zero. Neither side fsyncs. Inputs are generated once
# under $BENCH_OUT (default bench-out/, gitignored) and kept; outputs are deleted after measuring.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${BENCH_OUT:-bench-out}
mkdir -p "$OUT"
free_gb=$(df -BG --output=avail "$OUT" | tail -1 | tr -dc 0-9)
# 7b when its inputs are already generated (the runs need ~15 GB more) or 40 GB are free
PRESET=${1:-$([ -f "$OUT/base-7b/.complete" ] || [ "$free_gb" -ge 40 ] && echo 7b || echo 3b)}
case $PRESET in 7b | 3b) ;; *) echo "usage: $0 [7b|3b]" >&2; exit 2 ;; esac
cargo build --release -q
KILN=target/release/kiln
BASE=$OUT/base-$PRESET
LORA=$OUT/synth-$PRESET-lora
if [ ! -f "$BASE/.complete" ]; then
  python3 fixtures/gen_models.py "$OUT" --only "synth-$PRESET-base" >&2
  rm -rf "$BASE"
  mv "$OUT/synth-$PRESET-base/st-sharded" "$BASE"
  rmdir "$OUT/synth-$PRESET-base"
  touch "$BASE/.complete"
fi
if [ ! -f "$LORA/.complete" ]; then
  python3 fixtures/gen_lora.py "$OUT" --synth "$PRESET" >&2
  touch "$LORA/.complete"
fi
INPUTS=$(echo "$BASE"/*.safetensors "$LORA/adapter_model.safetensors")
in_bytes=$(cat $INPUTS | wc -c)
MERGED=$OUT/merged-$PRESET
GGUF=$OUT/merged-$PRESET.q4_k_m.gguf
rm -rf "$MERGED" "$GGUF" "$OUT/cat.out"

ROWS=()
# measure LABEL CMD...: cold cache, run, record "wall rss load" in ROWS
measure() {
  local label=$1
  shift
  sync
  echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
  local load
  load=$(cut -d' ' -f1 /proc/loadavg)
  echo "== $label (load $load): $*" >&2
  /usr/bin/time -f "%e %M" -o "$OUT/time.txt" "$@"
  read -r wall rss <"$OUT/time.txt"
  ROWS+=("$label|$wall|$((rss / 1024))|$load")
  echo "   wall $wall s, peak RSS $((rss / 1024)) MiB" >&2
}
wall_of() { for r in "${ROWS[@]}"; do [ "${r%%|*}" = "$1" ] && { echo "$r" | cut -d'|' -f2; return; }; done; }

measure "cat (baseline --out)" sh -c "cat $INPUTS > $OUT/cat.out"
rm -f "$OUT/cat.out"
measure "kiln merge --out" "$KILN" merge --base "$BASE" --lora "$LORA" --out "$MERGED" -q
out_bytes=$(cat "$MERGED"/*.safetensors | wc -c)
rm -rf "$MERGED"
gguf_bytes=0
if [ -z "${SKIP_GGUF:-}" ]; then
  measure "kiln merge --gguf q4_k_m" "$KILN" merge --base "$BASE" --lora "$LORA" --gguf "$GGUF" --outtype q4_k_m -q
  gguf_bytes=$(stat -c %s "$GGUF")
  rm -f "$GGUF" "$GGUF".SHA256SUMS "$OUT/SHA256SUMS"
  measure "cat > /dev/null + write GGUF size (baseline --gguf)" \
    sh -c "cat $INPUTS > /dev/null && head -c $gguf_bytes /dev/zero > $OUT/cat.out"
fi
rm -f "$OUT/cat.out" "$OUT/time.txt"

echo
gguf_note=""
[ "$gguf_bytes" -gt 0 ] && gguf_note=" q4_k_m GGUF $((gguf_bytes / 1000000)) MB;"
echo "$PRESET shape; inputs $((in_bytes / 1000000)) MB; --out safetensors $((out_bytes / 1000000)) MB;$gguf_note" \
  "$(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM"
echo
echo "| run | wall s | peak RSS MiB | ratio to baseline | load avg (1 min) at start |"
echo "|---|---:|---:|---:|---:|"
base_out=$(wall_of "cat (baseline --out)")
base_gguf=$(wall_of "cat > /dev/null + write GGUF size (baseline --gguf)" || true)
for r in "${ROWS[@]}"; do
  IFS='|' read -r label wall rss load <<<"$r"
  case $label in
  *--out) ratio=$(awk "BEGIN{printf \"%.2f\", $wall / $base_out}") ;;
  *q4_k_m) ratio=$(awk "BEGIN{printf \"%.2f\", $wall / $base_gguf}") ;;
  *) ratio=1.00 ;;
  esac
  echo "| $label | $wall | $rss | $ratio | $load |"
done
