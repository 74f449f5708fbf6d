#!/usr/bin/env bash
# BitStack measurements for docs/benchmarks.md: perplexity of the held-out text under a
# stack at several budgets and orders, and under the baselines at comparable bytes, one
# `ebb ppl` run per row, each with its wall time and peak RSS (GNU time), appended to a CSV.
#
#   tools/bitstack_sweep.sh ablation STACK OUT.csv   the three stack orders (importance, the
#                                                    file's own; random and uniform, copies
#                                                    made by tools/bitstack_reorder.py) at
#                                                    1.5, 2.5 and 3.5 levels' worth of bytes
#   tools/bitstack_sweep.sh budgets STACK OUT.csv    the file's order at every whole level,
#                                                    one to all (the ablation's importance
#                                                    rows give the half levels between)
#   tools/bitstack_sweep.sh halves STACK OUT.csv     the file's order at every half level, from
#                                                    none (a stack on a base: the base alone)
#                                                    to all
#   tools/bitstack_sweep.sh baselines SOURCE OUT.csv the source as it is (native), in f32,
#                                                    and round-to-nearest copies at 2, 3 and 4
#                                                    bits in groups of 64 (tools/rtn_gguf.py)
#
# Every run scores the same windows: CTX tokens each (default 512), the first CHUNKS of
# the text (default 8); THREADS compute threads (default: ebb's). Runs go one after another
# under nice, so that a shared machine stays usable; WORK (default /tmp/bitstack_sweep)
# holds the copies. A stack's level bytes are its total over its levels: every level of a
# matrix has the same rank, so every level costs the same.
#
# CSV columns: kind (order or baseline name), file, budget_levels (empty for baselines),
# stack_bytes asked, resident_bytes (empty for baselines), ppl, ppl_err, wall_s, peak_rss_kb.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
EBB=${EBB:-$ROOT/build/ebb}
PY=${PY:-$HOME/.cache/ebb/venv/bin/python}
TEXT=${TEXT:-$HOME/.cache/ebb/heldout.txt}
CTX=${CTX:-512}
CHUNKS=${CHUNKS:-8}
WORK=${WORK:-/tmp/bitstack_sweep}
THREAD_ARGS=()
[ -n "${THREADS:-}" ] && THREAD_ARGS=(-t "$THREADS")

usage() { sed -n '2,27p' "$0" >&2; exit 2; }
[ $# -eq 3 ] || usage
phase=$1 input=$2 csv=$3
mkdir -p "$WORK"
[ -s "$csv" ] || echo "kind,file,budget_levels,stack_bytes,resident_bytes,ppl,ppl_err,wall_s,peak_rss_kb" >"$csv"

# One `ebb ppl` run: kind, file, budget in levels (or empty), bytes (or empty), extra args.
measure() {
    local kind=$1 file=$2 levels=$3 bytes=$4; shift 4
    local out="$WORK/ppl.out" tm="$WORK/time.out" args=()
    [ -n "$bytes" ] && args=(--stack-bytes "$bytes")
    nice -n 10 /usr/bin/time -f "%e %M" -o "$tm" "$EBB" ppl -m "$file" -f "$TEXT" --ctx "$CTX" --chunks "$CHUNKS" \
        "${THREAD_ARGS[@]}" "${args[@]}" "$@" >"$out" 2>"$WORK/ppl.err" || { cat "$WORK/ppl.err" >&2; exit 1; }
    local ppl err resident wall rss
    read -r ppl err < <(sed -n 's/^PPL = \([0-9.]*\) +\/- \([0-9.]*\).*/\1 \2/p' "$out")
    resident=$(sed -n 's/^stack: \([0-9]*\) of .*/\1/p' "$out")
    read -r wall rss <"$tm"
    echo "$kind,$file,$levels,$bytes,$resident,$ppl,$err,$wall,$rss" | tee -a "$csv"
}

# Bytes of one level of a stack: the total its `ebb ppl` line reports over its levels.
level_bytes() {
    "$PY" "$ROOT/tools/bitstack_gguf.py" "$1"
}

# levels x bytes of one level, rounded down.
bytes_at() { awk -v l="$1" -v b="$2" 'BEGIN { printf "%d", l * b }'; }

case $phase in
ablation)
    read -r per levels < <(level_bytes "$input")
    "$PY" "$ROOT/tools/bitstack_reorder.py" "$input" --order random --seed 1 -o "$WORK/random.gguf" >&2
    "$PY" "$ROOT/tools/bitstack_reorder.py" "$input" --order uniform -o "$WORK/uniform.gguf" >&2
    for l in 1.5 2.5 3.5; do
        measure importance "$input" "$l" "$(bytes_at "$l" "$per")"
        measure random "$WORK/random.gguf" "$l" "$(bytes_at "$l" "$per")"
        measure uniform "$WORK/uniform.gguf" "$l" "$(bytes_at "$l" "$per")"
    done ;;
budgets)
    read -r per levels < <(level_bytes "$input")
    for l in $(seq 1 "$levels"); do measure importance "$input" "$l" "$(bytes_at "$l" "$per")"; done ;;
halves)
    read -r per levels < <(level_bytes "$input")
    for h in $(seq 0 $((2 * levels))); do
        l=$(awk -v h="$h" 'BEGIN { print h / 2 }')
        measure importance "$input" "$l" "$(bytes_at "$l" "$per")"
    done ;;
baselines)
    measure source "$input" "" "" --weights native
    measure f32 "$input" "" "" --weights f32
    for b in 2 3 4; do
        "$PY" "$ROOT/tools/rtn_gguf.py" "$input" --bits "$b" -o "$WORK/rtn$b.gguf" >&2
        measure "rtn$b" "$WORK/rtn$b.gguf" "" ""
        rm -f "$WORK/rtn$b.gguf"
    done ;;
*) usage ;;
esac
