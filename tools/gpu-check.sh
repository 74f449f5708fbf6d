#!/usr/bin/env bash
# The GPU checks, prepared here and run once on a lent GPU machine (whose
# time is short, and which has CUDA but none of ebb's Debian libraries).
#
#   tools/gpu-check.sh bundle [DIR]     here: build the GPU suite and the
#                                       product benchmark (CUDA on) and copy
#                                       them into DIR (gpu-bundle/, ignored by
#                                       git) with this checkout's revision, the
#                                       default model's first 4 layers (the
#                                       whole file is over the 64 MiB a run
#                                       carries; tools/gguf_first_layers.py)
#                                       and `ebb` with the Debian libraries
#                                       it and the tokenizer link, and the
#                                       maker of a Llama-3-8B-shaped model
#   tools/gpu-check.sh run DIR OUT      there: the device, the GPU suite
#                                       (every op against the scalar CPU path,
#                                       with the tuned kernels and again with
#                                       EBB_CUDA_KERNELS=reference; then that
#                                       model on the device against the CPU)
#                                       and the benchmarks (the products with
#                                       both kernels' rows; `ebb bench` of that
#                                       model on the device and on the CPU, and
#                                       of the 8B-shaped one on the device),
#                                       each under its own time limit, into OUT
#
# `run` exits 0 only when the suite ran and passed: a skip (no device) is a
# failure here, since this script exists to run on one. OUT gets
# nvidia-smi.txt, suite.txt, engine.txt, bench.csv, e2e.txt, e2e-8b.txt and summary.txt; the end of the
# output is the summary. Environment: EBB_GPU_SUITE_TIMEOUT (120 s),
# EBB_GPU_BENCH_TIMEOUT (300 s), EBB_GPU_BENCH_ARGS (e.g. --quick).
set -uo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)

bundle() {
    local dir=${1:-$here/gpu-bundle}
    set -e
    cmake -S "$here" -B "$here/build" -DCMAKE_BUILD_TYPE=Release -DEBB_CUDA=ON >/dev/null
    cmake --build "$here/build" -j "$(nproc)" --target test_cuda_ops test_cuda_engine bench_cuda_ops ebb
    mkdir -p "$dir/lib"
    cp "$here/build/test_cuda_ops" "$here/build/test_cuda_engine" "$here/build/bench_cuda_ops" "$here/build/ebb" "$dir/"
    for lib in libpcre2-8 libsqlite3 libuv libjansson; do
        cp -L "$(ldd "$here/build/ebb" | awk -v l="$lib" 'index($1, l) == 1 { print $3 }')" "$dir/lib/"
    done
    local py=${EBB_PYTHON:-$HOME/.cache/ebb/venv/bin/python}
    "$py" "$here/tools/gguf_first_layers.py" \
        "$here/models/SmolLM2-135M-Instruct.Q4_1.gguf" --layers 4 -o "$dir/first4.gguf"
    # the Llama-3-8B-shaped model is 4.6 GB, over what a run carries: its maker
    # goes instead, with the pure-Python packages it imports (numpy it finds there)
    local site
    site=$("$py" -c 'import gguf, os; print(os.path.dirname(os.path.dirname(gguf.__file__)))')
    mkdir -p "$dir/py"
    cp -r "$site/gguf" "$site/yaml" "$site/tqdm" "$dir/py/"
    rm -f "$dir"/py/yaml/_yaml*   # a compiled module for this Python only; PyYAML falls back without it
    find "$dir/py" -name __pycache__ -prune -exec rm -rf {} +
    cp "$here/tools/synthetic_gguf.py" "$dir/"
    git -C "$here" rev-parse HEAD > "$dir/revision"
    git -C "$here" diff --quiet HEAD || echo "(with uncommitted changes)" >> "$dir/revision"
    du -sh "$dir"
    echo "gpu-check: bundle in $dir; on the GPU machine: tools/gpu-check.sh run $(basename "$dir") \$OUT"
}

run() {
    local dir=${1:?run DIR OUT} out=${2:?run DIR OUT}
    mkdir -p "$out"
    # cuBLAS for the benchmark: the toolkit's, or the one PyTorch's wheels bring
    local libs=/usr/local/cuda/lib64:/usr/local/cuda/lib
    for d in /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu*/lib \
             /opt/torch/.venv/lib/python3*/site-packages/nvidia/cublas/lib; do
        [ -d "$d" ] && libs=$libs:$d
    done
    export LD_LIBRARY_PATH=$dir/lib:$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    {
        echo "revision: $(cat "$dir/revision" 2>/dev/null | tr '\n' ' ')"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
    } > "$out/summary.txt"
    { nvidia-smi || echo "nvidia-smi: not found or failed"; } > "$out/nvidia-smi.txt" 2>&1

    # the tuned kernels, then every product through the reference kernels
    { timeout "${EBB_GPU_SUITE_TIMEOUT:-120}" "$dir/test_cuda_ops" &&
      echo "--- EBB_CUDA_KERNELS=reference" &&
      EBB_CUDA_KERNELS=reference timeout "${EBB_GPU_SUITE_TIMEOUT:-120}" "$dir/test_cuda_ops"; } > "$out/suite.txt" 2>&1
    local suite=$?
    case $suite in
        0) echo "suite: passed" ;;
        77) echo "suite: SKIPPED (no device seen): $(tail -1 "$out/suite.txt")" ;;
        124) echo "suite: TIMED OUT after ${EBB_GPU_SUITE_TIMEOUT:-120} s" ;;
        *) echo "suite: FAILED (exit $suite)"; grep -m 20 "CHECK\|differs" "$out/suite.txt" ;;
    esac >> "$out/summary.txt"
    grep "checks" "$out/suite.txt" >> "$out/summary.txt"

    # the model on the device against the scalar CPU path and the fastest CPU path
    timeout "${EBB_GPU_SUITE_TIMEOUT:-120}" "$dir/test_cuda_engine" "$dir/first4.gguf" > "$out/engine.txt" 2>&1
    local engine=$?
    echo "engine: exit $engine" >> "$out/summary.txt"
    grep "vs scalar\|checks\|CHECK" "$out/engine.txt" | head -30 >> "$out/summary.txt"

    # shellcheck disable=SC2086
    timeout "${EBB_GPU_BENCH_TIMEOUT:-300}" "$dir/bench_cuda_ops" ${EBB_GPU_BENCH_ARGS:-} > "$out/bench.csv" 2> "$out/bench.err"
    local bench=$?
    # the reference kernels at decode and a small batch, for the tuned ones' gain
    # shellcheck disable=SC2086
    EBB_CUDA_KERNELS=reference timeout "${EBB_GPU_BENCH_TIMEOUT:-300}" "$dir/bench_cuda_ops" --quick 2>> "$out/bench.err" |
        awk -F, 'NR > 1 && $2 == "ebb-reference"' >> "$out/bench.csv"
    local rows
    rows=$(awk -F, 'NR > 1' "$out/bench.csv" | wc -l)
    echo "benchmark: exit $bench, $rows rows$( [ -s "$out/bench.err" ] && echo ": $(head -c 300 "$out/bench.err")")" >> "$out/summary.txt"
    # the decode rows (M = 1) as a short table: weight GB/s per kernel and shape
    awk -F, 'NR > 1 && $4 == 1 { printf "  %-16s %-6s %-5s %9.1f us %8.1f GB/s\n", $1, $2, $3, $7, $8 }' \
        "$out/bench.csv" >> "$out/summary.txt"

    # end to end: ebb bench of the carried model, on the device and on the host's CPUs
    for device in cuda cpu; do
        for kv in 32 4; do
            echo "--- --device $device --kv-bits $kv"
            timeout "${EBB_GPU_BENCH_TIMEOUT:-300}" "$dir/ebb" bench -m "$dir/first4.gguf" --device "$device" \
                --kv-bits "$kv" -p 512 -n 128 -b 16 -r 3 2>&1
        done
        # a pass of 1 and 2 tokens at a context of 4,000: the attention split over the
        # sequence (from position 1024) against the reference kernels' one block per query
        if [ "$device" = cuda ]; then
            for kernels in tuned reference; do
                echo "--- --device cuda --kv-bits 4, context 4000, $kernels kernels"
                EBB_CUDA_KERNELS=$kernels timeout "${EBB_GPU_BENCH_TIMEOUT:-300}" "$dir/ebb" bench -m "$dir/first4.gguf" \
                    --device cuda --kv-bits 4 -p 0 -n 0 --verify 1 --depth 4000 -r 3 2>&1
            done
        fi
    done > "$out/e2e.txt"
    grep -- "---\|^| pp\|^| tg\|^| [01] |\|backend\|ebb bench" "$out/e2e.txt" >> "$out/summary.txt"

    # the Llama-3-8B-shaped model (random Q4_0 blocks: speed does not depend on the
    # values), made here when a Python with numpy is, then `ebb bench` of it on the device
    local py="" p
    for p in /opt/torch/.venv/bin/python python3; do
        if command -v "$p" > /dev/null && "$p" -c "import numpy" 2> /dev/null; then py=$p; break; fi
    done
    if [ -z "$py" ]; then
        echo "8B-shaped model: not made (no Python with numpy here)" >> "$out/summary.txt"
    elif PYTHONPATH=$dir/py timeout "${EBB_GPU_BENCH_TIMEOUT:-300}" "$py" "$dir/synthetic_gguf.py" --type Q4_0 \
            --shape llama3-8b --tokenizer-from "$dir/first4.gguf" -o "$dir/llama3-8b.Q4_0.gguf" > "$out/e2e-8b.txt" 2>&1; then
        for kv in 32 4; do
            echo "--- llama3-8b-shaped Q4_0 --device cuda --kv-bits $kv"
            timeout "${EBB_GPU_BENCH_TIMEOUT:-300}" "$dir/ebb" bench -m "$dir/llama3-8b.Q4_0.gguf" --device cuda \
                --kv-bits "$kv" -p 512 -n 128 -b 16 -r 2 2>&1
        done >> "$out/e2e-8b.txt"
        grep -- "---\|^| pp\|^| tg\|ebb bench" "$out/e2e-8b.txt" >> "$out/summary.txt"
        rm -f "$dir/llama3-8b.Q4_0.gguf"
    else
        echo "8B-shaped model: not made: $(tail -c 300 "$out/e2e-8b.txt")" >> "$out/summary.txt"
    fi
    cat "$out/summary.txt"
    [ "$suite" -eq 0 ] && [ "$engine" -eq 0 ]
}

case ${1:-} in
    bundle) shift; bundle "$@" ;;
    run) shift; run "$@" ;;
    *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
