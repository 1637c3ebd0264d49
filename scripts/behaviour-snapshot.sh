#!/usr/bin/env bash
# Records what a kiln binary produces on the generated fixtures, so two builds can be compared:
# the sha256 of every GGUF / HF folder that convert, merge, quantize and imatrix write, every
# PPL / KLD value (JSON, timings removed), tokenizer ids, inspect output, and the demo pipeline's
# report with its timings removed.
#
#   scripts/behaviour-snapshot.sh BIN OUTDIR      # e.g. target/release/kiln /tmp/snap-new
#   diff -r /tmp/snap-old/results /tmp/snap-new/results && echo identical
#
# OUTDIR/results holds the comparable records; the files themselves are left in $SNAP_WORK
# (default /tmp/kiln-snapshot-work, one fixed path: quantized files record their imatrix's path). Needs python3
# with numpy, safetensors and sentencepiece (fixture generators) and ../shared beside the checkout.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
out=$2
shared=${KILN_SHARED:-$here/../shared}
fx=${SNAP_FIXTURES:-$here/target/snapshot-fixtures}
if [ ! -f "$fx/.complete" ]; then
  rm -rf "$fx" && mkdir -p "$fx"
  python3 "$here/fixtures/gen_models.py" "$fx/models" --shared "$shared" >/dev/null
  python3 "$here/fixtures/gen_lora.py" "$fx/lora" --shared "$shared" >/dev/null
  touch "$fx/.complete"
fi
# The work folder is always the same path: quantized files record their imatrix's path.
w=${SNAP_WORK:-${TMPDIR:-/tmp}/kiln-snapshot-work}
r=$out/results
rm -rf "$out" "$w" && mkdir -p "$w" "$r"
text=$shared/fixtures/texts/zh-libai.txt
k() { "$bin" "$@"; }
sum() { (cd "$w" && sha256sum "$@") >>"$r/sha256"; }
# JSON without the fields that measure time or name this run's folders
clean_json() { python3 -c '
import json, sys
drop = {"seconds", "tokens_per_second", "model", "kl_divergence_base", "path", "command", "cpu", "threads"}
def strip(v):
    if isinstance(v, dict):
        return {k: strip(x) for k, x in v.items() if k not in drop}
    if isinstance(v, list):
        return [strip(x) for x in v]
    return v
print(json.dumps(strip(json.load(sys.stdin)), indent=1, sort_keys=True))'; }

# convert: every model and layout at f16, one model at each outtype
for m in mha-llama2 gqa-zh odd-ffn odd-dim; do
  for l in st st-sharded bin bin-sharded; do
    k convert "$fx/models/$m/$l" -o "$w/conv-$m-$l.gguf" -q
    sum "conv-$m-$l.gguf"
  done
done
for m in pad-vocab mha-llama2-bf16 mha-llama2-f32; do
  k convert "$fx/models/$m/st" -o "$w/conv-$m.gguf" -q && sum "conv-$m.gguf"
done
for t in f32 bf16 q8_0; do
  k convert "$fx/models/gqa-zh/st" -o "$w/conv-gqa-zh-$t.gguf" --outtype "$t" -q
  sum "conv-gqa-zh-$t.gguf"
done

# quantize: every level of the GQA model, and the imatrix-weighted ones
f16=$w/conv-gqa-zh-st.gguf
k imatrix -m "$f16" -f "$text" -c 128 --chunks 3 -o "$w/imatrix.gguf" -q >"$r/imatrix.stdout" 2>/dev/null
sum imatrix.gguf
k imatrix -m "$f16" -f "$text" -c 128 --chunks 3 -o "$w/imatrix.dat" --output-format dat -q >/dev/null 2>&1
sum imatrix.dat
for q in Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K; do
  k quantize "$f16" "$w/q-$q.gguf" "$q" -q 2>/dev/null && sum "q-$q.gguf"
done
for q in Q2_K_S Q4_K_M Q4_0; do
  k quantize --imatrix "$w/imatrix.gguf" "$f16" "$w/qi-$q.gguf" "$q" -q 2>/dev/null && sum "qi-$q.gguf"
done
k quantize --pure --output-tensor-type q8_0 --tensor-type 'ffn_down=q6_k' "$f16" "$w/q-custom.gguf" Q4_K_S -q 2>/dev/null
sum q-custom.gguf
k quantize --dry-run "$f16" Q3_K_M >"$r/quantize-dry-run.txt"

# merge: GGUF f16 / q4_k_m and the HF folder, stacked adapters, the special adapter forms
L=$fx/lora
k merge --base "$L/base/st" --lora "$L/lora/zh-st" --gguf "$w/merge-zh.gguf" -q && sum merge-zh.gguf
k merge --base "$L/base/bin-sharded" --lora "$L/lora/zh-bin" --gguf "$w/merge-zh-q4km.gguf" --outtype q4_k_m -q
sum merge-zh-q4km.gguf
k merge --base "$L/base/st" --lora "$L/lora/zh-st" --out "$w/merge-zh-hf" --max-shard-size 1MB -q
(cd "$w" && find merge-zh-hf -type f | sort | xargs sha256sum) >>"$r/sha256"
k merge --base "$L/base/st" --lora "$L/lora/zh-st" --lora "$L/lora/zh2" --gguf "$w/merge-stack.gguf" -q
sum merge-stack.gguf
for a in rslora f32 fifo zh-keys; do
  k merge --base "$L/base/st" --lora "$L/lora/$a" --gguf "$w/merge-$a.gguf" -q 2>/dev/null && sum "merge-$a.gguf"
done
# refused inputs: the exit status and the message
for a in zh-embonly bad-bias bad-corrupt bad-dora bad-hidden bad-layers bad-noconfig bad-noembed bad-rankcfg bad-rmismatch bad-rows bad-unknown; do
  [ -d "$L/lora/$a" ] || continue
  k merge --base "$L/base/st" --lora "$L/lora/$a" --gguf "$w/merge-$a.gguf" -q >/dev/null 2>"$w/err" || echo "exit $?" >>"$r/refused.txt"
  sed "s|$fx|FX|g" "$w/err" >>"$r/refused.txt"
done
k merge --base "$L/base-tied/st" --lora "$L/lora/zh-st" --gguf "$w/merge-tied.gguf" -q && sum merge-tied.gguf
k merge --base "$L/base-bf16/st" --lora "$L/lora/zh-st" --gguf "$w/merge-bf16.gguf" --outtype bf16 -q
sum merge-bf16.gguf

# evaluation
for m in conv-gqa-zh-st q-Q4_K_M q-Q8_0 q-Q6_K qi-Q2_K_S; do
  k perplexity -m "$w/$m.gguf" -f "$text" -c 128 --json -q 2>/dev/null | clean_json >"$r/ppl-$m.json"
done
k perplexity -m "$w/conv-gqa-zh-st.gguf" -f "$text" -c 128 -b 32 --json -q 2>/dev/null | clean_json >"$r/ppl-f16-b32.json"
k perplexity -m "$f16" -f "$text" -c 128 --kl-divergence-base "$w/f16.kld" -q >/dev/null 2>&1
sum f16.kld
for m in q-Q4_K_M q-Q2_K; do
  k perplexity -m "$w/$m.gguf" --kl-divergence --kl-divergence-base "$w/f16.kld" --json -q 2>/dev/null \
    | clean_json >"$r/kld-$m.json"
done
k perplexity -m "$w/conv-mha-llama2-st.gguf" -f "$text" -c 256 --rope-scale 2 --json -q 2>/dev/null \
  | clean_json >"$r/ppl-rope.json"
k tokenize -m "$f16" -f "$text" --ids >"$r/tokenize-zh.txt"
k tokenize -m "$w/conv-mha-llama2-st.gguf" -p 'Hello <s> world' --parse-special >"$r/tokenize-special.txt"
k inspect "$w/q-Q4_K_M.gguf" --json | clean_json >"$r/inspect-q4km.json"
k bench -m "$w/q-Q4_0.gguf" -p 16 -n 4 -r 1 --json -q | python3 -c '
import json, sys
print(sorted(k for row in json.load(sys.stdin) for k in row))' >"$r/bench-fields.txt"

# the demo pipeline: report without timings, and every output hash
k demo --out "$w/demo" -q >/dev/null 2>&1
(cd "$w/demo/pipeline" && grep -v "  \(report\.\|kiln-manifest\|eval\/.*\.json\)" SHA256SUMS) >"$r/demo-sums.txt"
clean_json <"$w/demo/pipeline/report.json" >"$r/demo-report.json"
grep -v -i 'seconds\|tok/s\|command\|cpu\|threads\|kiln-demo\|/' "$w/demo/pipeline/report.md" >"$r/demo-report.md" || true
# the pipeline from an F16 GGUF with its own importance matrix and KLD
k pipeline --model "$f16" --out "$w/pipe" --quants q4_0,q4_k_m --eval-text "$text" -c 128 --chunks 3 \
  --kld --imatrix-text "$text" -q >/dev/null 2>&1
(cd "$w/pipe" && grep -v "  \(report\.\|kiln-manifest\|eval\/.*\.json\)" SHA256SUMS) >"$r/pipe-sums.txt"
clean_json <"$w/pipe/report.json" | sed "s|$w|W|g" >"$r/pipe-report.json"
echo "snapshot of $bin in $r ($(wc -l <"$r/sha256") hashed outputs)"
