#!/usr/bin/env bash
# The quality table of the W4A4KV4 issue, in one run: packs the variants of the default model
# (W4A16 with round-to-nearest and with GPTQ, W4A8, W4A4 with 8-bit outlier groups, and the
# source-exact W4A4 that keeps the source's Q4_1 blocks) into
# $EBB_CACHE/packed/ unless they are there already, then measures each one's perplexity on the
# held-out text (tools/heldout.py; never seen by calibration) beside f32 (the source dequantized)
# with a float32 and a KV4 cache and the source served natively (W4A8 source-exact: its 8-bit
# activation blocks of 32) with both, with its bytes, and finally the greedy agreement of 64-token chat answers on 50
# prompts (tools/agreement.py). Not a test: it takes about 30 minutes on 2 cores. Record the
# output in docs/benchmarks.md.
#
# Usage: tools/quality.sh [CHUNKS]     (windows of 512 tokens scored; default 16, 0 = all)
# Environment: EBB (default build/ebb), EBB_CACHE (default ~/.cache/ebb), REPACK=1 to pack anew.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
ebb=${EBB:-$here/build/ebb}
cache=${EBB_CACHE:-$HOME/.cache/ebb}
py=${PYTHON:-$cache/venv/bin/python}
chunks=${1:-16}
source_model=$here/models/SmolLM2-135M-Instruct.Q4_1.gguf
heldout=$("$py" "$here/tools/heldout.py")
packed=$cache/packed
mkdir -p "$packed"

pack() {   # name, then ebb pack options
    local name=$1; shift
    if [ ! -f "$packed/$name.gguf" ] || [ "${REPACK:-0}" = 1 ]; then
        echo "# $ebb pack -m $source_model $* -o $packed/$name.gguf" >&2
        "$ebb" pack -m "$source_model" "$@" --no-register --no-eval -o "$packed/$name.gguf" >&2
    fi
}
pack w4a16-rtn --format w4a16 --weight-quant rtn
pack w4a16 --format w4a16
pack w4a8 --format w4a4 --act-bits 8
pack w4a4 --format w4a4 --act-bits 4
pack source-w4a4 --format source --act-bits 4

chunk_args=()
[ "$chunks" != 0 ] && chunk_args=(--chunks "$chunks")
rows=()
measure() {   # label model kv_bits [weights]
    local out ppl
    echo "# $ebb ppl -m $2 -f $heldout --ctx 512 ${chunk_args[*]} --kv-bits $3 --weights ${4:-native}" >&2
    out=$("$ebb" ppl -m "$2" -f "$heldout" --ctx 512 "${chunk_args[@]}" --kv-bits "$3" --weights "${4:-native}" 2>&1 | tail -1)
    echo "$out" >&2
    ppl=$(echo "$out" | sed -n 's/^PPL = \([0-9.]*\).*/\1/p')
    rows+=("$1|$(stat -c %s "$2")|$ppl")
}
measure "f32" "$source_model" 32 f32
measure "KV4 only (f32 weights)" "$source_model" 4 f32
measure "source served natively (W4A8 source-exact)" "$source_model" 32
measure "W4A8KV4 source-exact (native + KV4)" "$source_model" 4
measure "W4A16 RTN" "$packed/w4a16-rtn.gguf" 32
measure "W4A16 GPTQ" "$packed/w4a16.gguf" 32
measure "W4A8KV4" "$packed/w4a8.gguf" 4
measure "W4A4KV4 (FMPQ)" "$packed/w4a4.gguf" 4
measure "W4A4KV4 source-exact" "$packed/source-w4a4.gguf" 4

base=${rows[0]##*|}
printf '\n| variant | file bytes | perplexity | vs f32 |\n|---|---|---|---|\n'
for r in "${rows[@]}"; do
    IFS='|' read -r label bytes ppl <<<"$r"
    awk -v l="$label" -v b="$bytes" -v p="$ppl" -v f="$base" \
        'BEGIN { printf "| %s | %d | %.4f | %+.1f%% |\n", l, b, p, 100 * (p / f - 1) }'
done
echo "(f32 runs the source file's weights in float32; its bytes are the source GGUF's)"
echo

EBB=$ebb "$py" "$here/tools/agreement.py" "f32:$source_model:32" "f32:$source_model:4" "$source_model:32" \
    "$source_model:4" "$packed/w4a16.gguf:32" "$packed/w4a8.gguf:4" "$packed/w4a4.gguf:4" "$packed/source-w4a4.gguf:4"
