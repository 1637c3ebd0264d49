#!/usr/bin/env bash
# kiln convert on a 7B-shaped sharded F16 checkpoint (dim 4096, 32 layers, ffn 11008, vocab 55,296,
# ~13.5 GB), against `cat` of the same bytes, with peak RSS from /usr/bin/time -v.
#   benches/convert.sh [7b|3b]      (3b when the disk has under 40 GB free)
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-7b}
OUT=${BENCH_OUT:-bench-out}; mkdir -p "$OUT"
cargo build --release -q
SRC=$OUT/hf-$PRESET
[ -f "$SRC/.complete" ] || { python3 fixtures/gen_models.py "$OUT" --only "synth-$PRESET" --shared ../shared >&2 && \
  mv "$OUT/synth-$PRESET/st-sharded" "$SRC" && touch "$SRC/.complete"; }
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
/usr/bin/time -f "cat: wall %e s, peak RSS %M KB" sh -c "cat $SRC/*.safetensors > $OUT/cat.out"
rm -f "$OUT/cat.out"; sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
/usr/bin/time -f "kiln convert: wall %e s, peak RSS %M KB" target/release/kiln convert "$SRC" -o "$OUT/conv.gguf" -q
ls -l "$OUT/conv.gguf"; rm -f "$OUT/conv.gguf"
