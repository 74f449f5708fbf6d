#!/usr/bin/env bash
# Speed side by side, in one run: ebb's prefill (pp512) and decode (tg128) for each
# configuration given, and llama.cpp's llama-bench on the same machine for F32, Q4_0 and
# Q4_1 of the same model, then the ratios the issues ask for, and each decode rate as a
# share of the machine's copy-loop bandwidth (bytes of weights read per token times
# tokens per second; `ebb bench` measures the copy loop; for llama.cpp the weights read
# are the file's tensor bytes, its head being the tied embedding). Not a test: numbers depend on
# the machine and on what else runs; run it on a quiet machine and record the output in
# docs/benchmarks.md.
#
# Usage: tools/bench.sh [EBB_MODEL_OR_PACKED[:KV_BITS] ...]
#   default: the f32 path of models/SmolLM2-135M-Instruct.Q4_1.gguf, then the W4A4KV4 and
#   W4A8KV4 variants in $EBB_CACHE/packed/ when present (tools/quality.sh packs them)
# Environment: LLAMA_CPP_DIR (llama.cpp binaries, built outside the repo; see
#   tools/llamacpp.sh), THREADS (default 2), REPS (default 3), EBB (default build/ebb).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
ebb=${EBB:-$here/build/ebb}
threads=${THREADS:-2}
reps=${REPS:-3}
bin=${LLAMA_CPP_DIR:-/work/ext/llama.cpp/build/bin}
cache=${EBB_CACHE:-$HOME/.cache/ebb}
py=${PYTHON:-$cache/venv/bin/python}
source_model=$here/models/SmolLM2-135M-Instruct.Q4_1.gguf
configs=("$@")
if [ ${#configs[@]} -eq 0 ]; then
    configs=("$source_model:32")
    for v in w4a4 w4a8; do
        [ -f "$cache/packed/$v.gguf" ] && configs+=("$cache/packed/$v.gguf:4")
    done
fi

declare -A pp tg share
bw=0
run_ebb() {   # label model kv_bits
    local out
    echo "# $ebb bench -m $2 -t $threads -r $reps --kv-bits $3" >&2
    out=$("$ebb" bench -m "$2" -t "$threads" -r "$reps" --kv-bits "$3")
    echo "$out" >&2
    pp[$1]=$(echo "$out" | awk '/\| pp/ {print $4}')
    tg[$1]=$(echo "$out" | awk '/\| tg/ {print $4}')
    share[$1]=$(echo "$out" | sed -n 's/.*tg at \([0-9.]*\)%.*/\1%/p')
    bw=$(echo "$out" | sed -n 's/.*copy loop \([0-9.]*\) GB\/s.*/\1/p')
}
run_llama() {   # label model
    local out
    echo "# $bin/llama-bench -m $2 -t $threads -r $reps -p 512 -n 128 -o jsonl" >&2
    out=$("$bin/llama-bench" -m "$2" -t "$threads" -r "$reps" -p 512 -n 128 -o jsonl 2>/dev/null)
    echo "$out" | "$py" -c 'import json,sys
for line in sys.stdin:
    r = json.loads(line)
    print(("pp" if r["n_prompt"] else "tg"), round(r["avg_ts"], 2))' > "$tmp"
    pp[$1]=$(awk '$1 == "pp" {print $2}' "$tmp")
    tg[$1]=$(awk '$1 == "tg" {print $2}' "$tmp")
    share[$1]=$("$py" -c 'import sys, gguf
r = gguf.GGUFReader(sys.argv[1]); b = sum(int(t.n_bytes) for t in r.tensors)
tg, bw = float(sys.argv[2] or 0), float(sys.argv[3] or 0)
print(f"{100 * b * tg / (bw * 1e9):.1f}%" if bw > 0 else "?")' "$2" "${tg[$1]}" "$bw" 2>/dev/null || echo "?")
}
tmp=$(mktemp); trap 'rm -f "$tmp"' EXIT

labels=()
for c in "${configs[@]}"; do
    model=${c%%:*}; kv=${c##*:}; [ "$kv" = "$c" ] && kv=32
    label="ebb $(basename "$model" .gguf) kv$kv"
    labels+=("$label"); run_ebb "$label" "$model" "$kv"
done
if [ -x "$bin/llama-bench" ]; then
    for q in F32 Q4_0; do
        f=$cache/SmolLM2-135M-Instruct.$q.gguf
        [ -f "$f" ] && { labels+=("llama.cpp $q"); run_llama "llama.cpp $q" "$f"; }
    done
    labels+=("llama.cpp Q4_1"); run_llama "llama.cpp Q4_1" "$source_model"
else
    echo "# llama.cpp not found at $bin: ebb numbers only" >&2
fi

printf '\n| configuration | pp512 t/s | tg128 t/s | tg share of copy bandwidth (%s GB/s) |\n|---|---|---|---|\n' "$bw"
for l in "${labels[@]}"; do printf '| %s | %s | %s | %s |\n' "$l" "${pp[$l]:-?}" "${tg[$l]:-?}" "${share[$l]:-?}"; done
first=${labels[0]}
ratio() {   # a b: prefill and decode of a over b
    awk -v a="$1" -v b="$2" -v ppa="${pp[$1]:-0}" -v ppb="${pp[$2]:-0}" -v tga="${tg[$1]:-0}" -v tgb="${tg[$2]:-0}" \
        'BEGIN { if (ppb > 0 && tgb > 0) printf "  %s / %s: prefill %.2fx, decode %.2fx\n", a, b, ppa/ppb, tga/tgb }'
}
printf '\nratios:\n'
for l in "${labels[@]}"; do
    case "$l" in
    "$first") ;;
    ebb*) ratio "$l" "$first"; ratio "$l" "llama.cpp Q4_0"; ratio "$l" "llama.cpp Q4_1" ;;
    esac
done
ratio "$first" "llama.cpp F32"
