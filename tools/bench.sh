#!/usr/bin/env bash
# Speed side by side, in one run: ebb's prefill (pp512) and decode (tg128) on each file given
# and llama.cpp's llama-bench on the same file, then ebb / llama.cpp per file as ratios, with
# each process's resident memory after the run beside the file's size. A packed ebb variant
# (which llama.cpp cannot read) is compared with llama.cpp's Q4_0 and Q4_1 rows of the same
# run. Each decode rate is also given as a share of the machine's copy-loop bandwidth (bytes
# of weights read per token times tokens per second; `ebb bench` measures the copy loop; for
# llama.cpp the weights read are the file's tensor bytes). Not a test: numbers depend on the
# machine and on what else runs; run it on a quiet machine and record the output in
# docs/benchmarks.md.
#
# Usage: tools/bench.sh [MODEL[:KV_BITS] ...]
#   default: the native GGUF types of the default model, each computed natively: the source
#   (Q4_1) and the Q4_0, Q8_0 and Q4_K_M conversions in $EBB_CACHE (tools/llamacpp.sh convert
#   makes them), then the source on ebb's f32 path; SYNTHETIC=1: the 1.1B-parameter synthetic
#   files $EBB_CACHE/synthetic-1.1B.{Q4_0,Q4_K}.gguf (tools/synthetic_gguf.py writes them).
#   f32:PATH runs PATH on ebb's dequantized path (--weights f32).
# Environment: LLAMA_CPP_DIR (llama.cpp binaries, built outside the repo; see
#   tools/llamacpp.sh), THREADS (default 2), REPS (default 3), EBB (default build/ebb).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
ebb=${EBB:-$here/build/ebb}
threads=${THREADS:-2}
reps=${REPS:-3}
bin=${LLAMA_CPP_DIR:-/work/ext/llama.cpp/build-avx2/bin}
cache=${EBB_CACHE:-$HOME/.cache/ebb}
py=${PYTHON:-$cache/venv/bin/python}
source_model=$here/models/SmolLM2-135M-Instruct.Q4_1.gguf
configs=("$@")
if [ ${#configs[@]} -eq 0 ]; then
    if [ "${SYNTHETIC:-0}" = 1 ]; then
        for q in Q4_0 Q4_K; do configs+=("$cache/synthetic-1.1B.$q.gguf"); done
    else
        configs=("$source_model")
        for q in Q4_0 Q8_0 Q4_K_M; do
            f=$cache/SmolLM2-135M-Instruct.$q.gguf
            [ -f "$f" ] && configs+=("$f")
        done
        configs+=("f32:$source_model")
    fi
fi

declare -A pp tg share rss size
bw=0
tmp=$(mktemp); trap 'rm -f "$tmp"' EXIT

is_packed() { head -c 1048576 "$1" | grep -aq 'ebb\.format'; }

run_ebb() {   # label model kv_bits weights
    local out
    echo "# $ebb bench -m $2 -t $threads -r $reps --kv-bits $3 --weights $4" >&2
    out=$("$ebb" bench -m "$2" -t "$threads" -r "$reps" --kv-bits "$3" --weights "$4")
    echo "$out" >&2
    pp[$1]=$(echo "$out" | awk '/\| pp/ {print $4}')
    tg[$1]=$(echo "$out" | awk '/\| tg/ {print $4}')
    share[$1]=$(echo "$out" | sed -n 's/.*tg at \([0-9.]*\)%.*/\1%/p')
    rss[$1]=$(echo "$out" | sed -n 's/.*after the tests \([0-9.]*\) MiB.*/\1/p')
    bw=$(echo "$out" | sed -n 's/.*copy loop \([0-9.]*\) GB\/s.*/\1/p')
}
run_llama() {   # label model
    local out
    echo "# $bin/llama-bench -m $2 -t $threads -r $reps -p 512 -n 128 -o jsonl" >&2
    local timer=()   # GNU time (Debian package `time`) for llama-bench's peak RSS, when installed
    [ -x /usr/bin/time ] && timer=(/usr/bin/time -f 'maxrss %M' -o "$tmp.rss")
    out=$("${timer[@]}" "$bin/llama-bench" -m "$2" -t "$threads" -r "$reps" -p 512 -n 128 -o jsonl 2>/dev/null)
    echo "$out" | "$py" -c 'import json,sys
for line in sys.stdin:
    r = json.loads(line)
    print(("pp" if r["n_prompt"] else "tg"), round(r["avg_ts"], 2))' > "$tmp"
    pp[$1]=$(awk '$1 == "pp" {print $2}' "$tmp")
    tg[$1]=$(awk '$1 == "tg" {print $2}' "$tmp")
    rss[$1]=$([ -f "$tmp.rss" ] && awk '{printf "%.1f (peak)", $2 / 1024}' "$tmp.rss" || echo "?")
    rm -f "$tmp.rss"
    share[$1]=$("$py" -c 'import sys, gguf
r = gguf.GGUFReader(sys.argv[1]); b = sum(int(t.n_bytes) for t in r.tensors)
tg, bw = float(sys.argv[2] or 0), float(sys.argv[3] or 0)
print(f"{100 * b * tg / (bw * 1e9):.1f}%" if bw > 0 else "?")' "$2" "${tg[$1]}" "$bw" 2>/dev/null || echo "?")
}
have_llama=0
[ -x "$bin/llama-bench" ] && have_llama=1 || echo "# llama.cpp not found at $bin: ebb numbers only" >&2

labels=()
pairs=()      # "ebb label|llama.cpp label"
packed=()
for c in "${configs[@]}"; do
    weights=native
    case "$c" in f32:*) weights=f32; c=${c#f32:} ;; esac
    model=${c%%:*}; kv=${c##*:}; [ "$kv" = "$c" ] && kv=32
    name=$(basename "$model" .gguf)
    [ -f "$model" ] || { echo "# $model not found: skipped" >&2; continue; }
    label="ebb $name ($weights, kv$kv)"
    labels+=("$label"); run_ebb "$label" "$model" "$kv" "$weights"
    size[$label]=$(awk -v b="$(stat -c %s "$model")" 'BEGIN { printf "%.1f", b / 1048576 }')
    if is_packed "$model"; then
        packed+=("$label")
    elif [ $have_llama = 1 ]; then
        # ebb's f32 path meets llama.cpp's F32 conversion of the same weights
        llfile=$model; [ $weights = f32 ] && llfile=$(dirname "$model")/${name%.*}.F32.gguf
        [ $weights = f32 ] && [ ! -f "$llfile" ] && llfile=$cache/${name%.*}.F32.gguf
        if [ -f "$llfile" ]; then
            ll="llama.cpp $(basename "$llfile" .gguf)"
            if [ -z "${pp[$ll]:-}" ]; then
                labels+=("$ll"); run_llama "$ll" "$llfile"
                size[$ll]=$(awk -v b="$(stat -c %s "$llfile")" 'BEGIN { printf "%.1f", b / 1048576 }')
            fi
            pairs+=("$label|$ll")
        fi
    fi
done
if [ ${#packed[@]} -gt 0 ] && [ $have_llama = 1 ]; then
    for q in Q4_0 Q4_1; do
        f=$cache/SmolLM2-135M-Instruct.$q.gguf; [ $q = Q4_1 ] && f=$source_model
        ll="llama.cpp SmolLM2-135M-Instruct.$q"
        if [ -f "$f" ] && [ -z "${pp[$ll]:-}" ]; then
            labels+=("$ll"); run_llama "$ll" "$f"; size[$ll]=$(awk -v b="$(stat -c %s "$f")" 'BEGIN { printf "%.1f", b / 1048576 }')
        fi
        for p in "${packed[@]}"; do pairs+=("$p|$ll"); done
    done
fi

printf '\n| configuration | pp512 t/s | tg128 t/s | tg share of copy bandwidth (%s GB/s) | RSS MiB | file MiB |\n' "$bw"
printf '|---|---|---|---|---|---|\n'
for l in "${labels[@]}"; do
    printf '| %s | %s | %s | %s | %s | %s |\n' "$l" "${pp[$l]:-?}" "${tg[$l]:-?}" "${share[$l]:-?}" "${rss[$l]:-?}" \
        "${size[$l]:-?}"
done
printf '\nratios (ebb / llama.cpp, same run):\n'
for pr in "${pairs[@]}"; do
    a=${pr%%|*}; b=${pr##*|}
    awk -v a="$a" -v b="$b" -v ppa="${pp[$a]:-0}" -v ppb="${pp[$b]:-0}" -v tga="${tg[$a]:-0}" -v tgb="${tg[$b]:-0}" \
        'BEGIN { if (ppb > 0 && tgb > 0) printf "  %s / %s: prefill %.2fx, decode %.2fx\n", a, b, ppa/ppb, tga/tgb }'
done
