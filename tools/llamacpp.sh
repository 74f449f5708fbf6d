#!/usr/bin/env bash
# llama.cpp side-by-side measurements: perplexity on the held-out text and llama-bench speed.
#
# llama.cpp is the outside yardstick for ebb's perplexity and speed. It is never vendored, built
# or needed by the tests: build it from its own repository somewhere outside this repo (CPU only,
# e.g. cmake -DGGML_NATIVE=ON -DLLAMA_CURL=OFF, targets llama-perplexity llama-bench
# llama-quantize) and point LLAMA_CPP_DIR at its bin/ folder. This script only runs it.
#
# Which build: on an AVX-512 machine, llama.cpp c392e50 built with GGML_NATIVE=ON scored this
# model's Q4_0 and Q4_1 files at perplexity 550 and 695 (its AVX2 build: 48.5 and 37.6), so the
# reference is built for AVX2 (-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON).
#
# Usage: tools/llamacpp.sh [convert|ppl|bench|all]     (default: all)
#   convert  make F32 (from the source), then Q4_0, Q8_0 and Q4_K_M (from the F32) copies of the
#            model in the cache with llama-quantize (once)
#   ppl      llama-perplexity on tools/heldout.py's text, ctx 512, for the F32 and source models
#   bench    llama-bench pp512 and tg128 for F32, source (Q4_1) and Q4_0
# Environment:
#   LLAMA_CPP_DIR  llama.cpp binaries        (default /work/ext/llama.cpp/build/bin)
#   EBB_MODEL      source GGUF                (default models/SmolLM2-135M-Instruct.Q4_1.gguf)
#   EBB_CACHE      where converted models go  (default ~/.cache/ebb)
#   THREADS        threads for every run      (default 2)
#   CTX            perplexity window          (default 512)
#   CHUNKS         limit perplexity to the first N windows (default: all)
#   REPS           llama-bench repetitions    (default 5)
#   PPL_MODELS / BENCH_MODELS   override the model lists (space-separated paths)
# Output: one line per measurement on stdout, "llama.cpp <what> key=value ...", with the exact
# command before it as a "# " comment; llama.cpp's own logs go to $EBB_CACHE/llamacpp-logs/.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
bin=${LLAMA_CPP_DIR:-/work/ext/llama.cpp/build/bin}
cache=${EBB_CACHE:-$HOME/.cache/ebb}
model=${EBB_MODEL:-$here/models/SmolLM2-135M-Instruct.Q4_1.gguf}
threads=${THREADS:-2}
ctx=${CTX:-512}
logs=$cache/llamacpp-logs
python=$cache/venv/bin/python
[ -x "$python" ] || python=python3

base=$(basename "$model" .gguf)
stem=${base%.*}                       # SmolLM2-135M-Instruct.Q4_1 -> SmolLM2-135M-Instruct
f32=$cache/$stem.F32.gguf
q4_0=$cache/$stem.Q4_0.gguf
q8_0=$cache/$stem.Q8_0.gguf
q4_k_m=$cache/$stem.Q4_K_M.gguf

die() { echo "llamacpp.sh: $*" >&2; exit 1; }
need() { [ -x "$bin/$1" ] || die "$bin/$1 not found: build llama.cpp outside the repo and set LLAMA_CPP_DIR"; }
show() { printf '# %s\n' "$*"; }

convert() {
    need llama-quantize
    [ -f "$model" ] || die "model $model not found"
    mkdir -p "$cache" "$logs"
    # --allow-requantize: the source is already quantized; F32 is an exact expansion of its
    # weights, and the other types re-quantize that expansion (lossy relative to the original
    # model, as any conversion of a 4-bit file is).
    for pair in "F32:$f32:$model" "Q4_0:$q4_0:$f32" "Q8_0:$q8_0:$f32" "Q4_K_M:$q4_k_m:$f32"; do
        type=${pair%%:*}; rest=${pair#*:}; out=${rest%%:*}; from=${rest#*:}
        [ -f "$out" ] && continue
        show "$bin/llama-quantize --allow-requantize $from $out $type"
        "$bin/llama-quantize" --allow-requantize "$from" "$out.part" "$type" > "$logs/quantize-$type.log" 2>&1 \
            || die "llama-quantize $type failed, see $logs/quantize-$type.log"
        mv "$out.part" "$out"
    done
}

ppl() {
    need llama-perplexity
    mkdir -p "$logs"
    local text; text=$("$python" "$here/tools/heldout.py")
    local models=${PPL_MODELS:-"$f32 $model"}
    local chunk_args=(); [ -n "${CHUNKS:-}" ] && chunk_args=(--chunks "$CHUNKS")
    for m in $models; do
        [ -f "$m" ] || die "$m not found (run: $0 convert)"
        local log=$logs/perplexity-$(basename "$m" .gguf)-ctx$ctx.log
        # --no-escape: by default llama.cpp rewrites escape sequences (\\ \n \t ...) in the text
        # read with -f before tokenizing; the held-out text has backslashes, and ebb scores the
        # file verbatim, so both must see the same bytes.
        local cmd=("$bin/llama-perplexity" -m "$m" -f "$text" --ctx-size "$ctx" -t "$threads" --no-escape "${chunk_args[@]}")
        show "${cmd[*]}"
        local t0; t0=$(date +%s.%N)
        "${cmd[@]}" > "$log" 2>&1 || die "llama-perplexity failed, see $log"
        local t1; t1=$(date +%s.%N)
        "$python" - "$log" "$m" "$ctx" "$t0" "$t1" <<'PY'
import re, sys
log, model, ctx, t0, t1 = sys.argv[1:]
text = open(log, encoding="utf-8", errors="replace").read()
final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
chunks = re.search(r"calculating perplexity over (\d+) chunks", text)
tokens = re.search(r"tokenizes to only (\d+) tokens", text)
if not final:
    sys.exit(f"no final perplexity in {log}")
print(f"llama.cpp ppl model={model} ctx={ctx} chunks={chunks.group(1) if chunks else '?'} "
      f"ppl={final.group(1)} stderr={final.group(2)} wall_s={float(t1) - float(t0):.1f}")
PY
    done
}

bench() {
    need llama-bench
    mkdir -p "$logs"
    local models=${BENCH_MODELS:-"$f32 $model $q4_0"}
    for m in $models; do
        [ -f "$m" ] || die "$m not found (run: $0 convert)"
        local log=$logs/bench-$(basename "$m" .gguf).jsonl
        local cmd=("$bin/llama-bench" -m "$m" -p 512 -n 128 -t "$threads" -r "${REPS:-5}" -o jsonl)
        show "${cmd[*]}"
        "${cmd[@]}" > "$log" 2> "$log.stderr" || die "llama-bench failed, see $log.stderr"
        "$python" - "$log" "$m" <<'PY'
import json, sys
log, model = sys.argv[1:]
for line in open(log):
    line = line.strip()
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    test = f"pp{r['n_prompt']}" if r.get("n_prompt") else f"tg{r['n_gen']}"
    print(f"llama.cpp bench model={model} test={test} threads={r.get('n_threads')} "
          f"tok_s={r['avg_ts']:.2f} stddev={r['stddev_ts']:.2f} build={r.get('build_commit')}")
PY
    done
}

case "${1:-all}" in
    convert) convert ;;
    ppl) convert; ppl ;;
    bench) convert; bench ;;
    all) convert; ppl; bench ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" ;;
    *) die "unknown command '$1' (convert, ppl, bench, all)" ;;
esac
