#!/bin/sh
# Coverage-guided fuzzing of ebb's input surfaces (tests/fuzz/README.md).
#
#   tools/fuzz.sh [SECONDS] [TARGET...]
#
# Builds build-fuzz/ with clang (-DEBB_FUZZ=ON: libFuzzer, ASan, UBSan) and
# runs each target (default: all of http json gguf tokenizer catalog) for
# SECONDS (default 60), one after the other, with leak detection on. The
# seeds in tests/fuzz/TARGET/ are read, never written: the corpus the run
# grows goes to $EBB_FUZZ_DIR/TARGET (default ~/.cache/ebb/fuzz/TARGET) and
# is reused by the next run; crashes, leaks and timeouts are written to
# $EBB_FUZZ_DIR/crashes/TARGET/. Exits non-zero when any target found one:
# minimise it (fuzz_TARGET -minimize_crash=1 FILE), fix the bug and add the
# reproducer to tests/fuzz/TARGET/ as crash-<what>, so that ctest's
# fuzz_TARGET_replay keeps it fixed. Each target's last statistics line
# (execs, coverage, corpus) goes to $EBB_FUZZ_DIR/TARGET.log.
#
# Environment: EBB_FUZZ_DIR as above; EBB_FUZZ_JOBS (default 1) runs that
# many targets at once; EBB_FUZZ_ARGS adds libFuzzer flags (e.g. -jobs=2);
# EBB_MODEL the GGUF whose vocabulary the tokenizer target uses.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
[ $# -gt 0 ] && shift
targets=${*:-http json gguf tokenizer catalog grammar}
out=${EBB_FUZZ_DIR:-$HOME/.cache/ebb/fuzz}
build=$root/build-fuzz

case $seconds in *[!0-9]*|'') echo "usage: tools/fuzz.sh [SECONDS] [TARGET...]" >&2; exit 2 ;; esac
for t in $targets; do
    case $t in http|json|gguf|tokenizer|catalog|grammar) ;; *) echo "fuzz.sh: no target '$t'" >&2; exit 2 ;; esac
done
command -v clang >/dev/null || { echo "fuzz.sh: clang is needed (apt-get install clang)" >&2; exit 2; }

if [ ! -f "$build/CMakeCache.txt" ]; then
    # No CUDA: nvcc compiles .cu files with gcc, which has no libFuzzer flags, and
    # the targets read files, not device memory.
    CC=clang cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEBB_FUZZ=ON -DEBB_CUDA=OFF >/dev/null
fi
nice cmake --build "$build" -j2 --target $(for t in $targets; do printf 'fuzz_%s ' "$t"; done) >/dev/null

# Per target: the longest input worth mutating, and the dictionary.
max_len() {
    case $1 in
        http) echo 8192 ;;       # headers cap at 4 KiB, bodies at 16 KiB in the harness
        json) echo 4096 ;;
        gguf|catalog) echo 65536 ;;  # the tiny models of the seed corpus are < 64 KiB
        tokenizer) echo 2048 ;;
        grammar) echo 4096 ;;    # grammars, schemas and tool lists of a few KiB say it all
    esac
}
dict() {
    case $1 in http|json) echo "-dict=$root/tests/fuzz/$1.dict" ;; *) echo "" ;; esac
}

run_one() {
    t=$1
    mkdir -p "$out/$t" "$out/crashes/$t"
    echo "fuzz.sh: $t for ${seconds}s (corpus $out/$t, crashes $out/crashes/$t)" >&2
    status=0
    stamp=$out/crashes/.$t.start
    : >"$stamp"
    # EBB_SOURCE_DIR: the tokenizer target finds the default model there.
    EBB_SOURCE_DIR=$root ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
        nice "$build/fuzz_$t" -max_total_time="$seconds" -max_len="$(max_len "$t")" -timeout=20 \
        -rss_limit_mb=4096 -detect_leaks=1 -error_exitcode=99 -print_final_stats=1 $(dict "$t") \
        -artifact_prefix="$out/crashes/$t/" ${EBB_FUZZ_ARGS:-} \
        "$out/$t" "$root/tests/fuzz/$t" >"$out/$t.log" 2>&1 || status=$?
    grep -E '^#[0-9]+.*(DONE|pulse)' "$out/$t.log" | tail -1 >&2 || true
    grep -E '^stat::' "$out/$t.log" >&2 || true
    if [ "$status" -eq 77 ]; then
        echo "fuzz.sh: $t skipped: $(tail -1 "$out/$t.log")" >&2
        return 0
    fi
    new=$(find "$out/crashes/$t" -type f -newer "$stamp" | tr '\n' ' ')
    if [ "$status" -ne 0 ] || [ -n "$new" ]; then
        echo "fuzz.sh: $t FOUND A PROBLEM (exit $status): $new" >&2
        grep -E 'ERROR|SUMMARY|fuzz invariant' "$out/$t.log" | head -5 >&2 || true
        return 1
    fi
}

failed=0
jobs=${EBB_FUZZ_JOBS:-1}
if [ "$jobs" -le 1 ]; then
    for t in $targets; do run_one "$t" || failed=1; done
else
    running=0
    pids=""
    for t in $targets; do
        run_one "$t" & pids="$pids $!"
        running=$((running + 1))
        if [ "$running" -ge "$jobs" ]; then
            for p in $pids; do wait "$p" || failed=1; done
            pids=""
            running=0
        fi
    done
    for p in $pids; do wait "$p" || failed=1; done
fi
exit $failed
