#!/usr/bin/env bash
# The measurement round on a GPU machine, the same every time; each step fits one 10-minute call and prints its
# table last. Run from the repository root after `. bench/gpu_setup.sh run` (which starts building llama-bench).
#
#   bench/gpu_round.sh files            synthetic GGUF files into /tmp: Qwen3-30B-A3B shape (48 layers, 17 GB), the
#                                       DeepSeek-V3 3-layer slice (13 GB) and its Zipf-skewed twin
#   bench/gpu_round.sh tests            the CUDA tests (offload decode graphs with the CPU pool, partial layers, GPU
#                                       kernels, quantized GPU weights, streamed prefill)
#   bench/gpu_round.sh kernels          one decode layer's CPU work alone (threads; weights in numpy, pinned,
#                                       huge-page, file-mapped memory) and as host nodes; the hand-over in a graph: host
#                                       node against the spinning pool's doorbell
#   bench/gpu_round.sh timeline SHAPE   where a decode step's time goes per MoE layer, cache off (qwen3_moe|deepseek_v3),
#                                       the pool's hand-over and the host nodes' in turn
#   bench/gpu_round.sh decode SHAPE     against llama.cpp: cache off, equal VRAM budget, all in VRAM (+ skewed for
#                                       deepseek_v3), decode and pp512, default settings
#   bench/gpu_round.sh prefill SHAPE    pp512 and pp4096 with the experts off the GPU against llama.cpp's -ub 512,
#                                       2048 and 4096
set -uo pipefail
export PYTHONUNBUFFERED=1 BENCH_STACKS_EVERY=${BENCH_STACKS_EVERY:-150}  # every thread's stack now and then: a step cut
                                                                       # off by the call's limit shows where it was
LOG="${OUT:-/tmp}/round-${1:-none}${2:+-$2}.log"  # the whole output of each step (the table is printed last)
keep() { tee -a "$LOG" | grep -v Warning; }
DIR=/tmp
LLAMA=${LLAMA_BENCH:-/tmp/llama.cpp/build/bin/llama-bench}
LOAD=${HYBRIDMOE_LOAD:-"{}"}   # extra load options as JSON (the defaults are what a user gets)
layers() { [ "$1" = deepseek_v3 ] && echo "--layers 3" || echo ""; }

case "${1:-}" in
files)
    for f in "qwen3_moe uniform 0" "deepseek_v3 uniform 0" "deepseek_v3 skewed 1.2"; do
        set -- $f
        [ -f "$DIR/$1-$2.gguf" ] || python3 bench/synthetic.py "$1" "$DIR/$1-$2.gguf" $(layers "$1") --zipf "$3" \
            2>/dev/null | tail -1
    done
    ;;
tests)
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gguf/test_gguf_offload.py tests/kernels/test_cpu_host_pool.py \
        tests/kernels/test_gpu_kernels.py tests/kernels/test_gpu_quant_linear.py tests/kernels/test_gpu_moe_gemm.py \
        tests/gguf/test_gguf_stream.py tests/gguf/test_gguf_stream_grouped.py tests/gguf/test_gguf_batch.py 2>&1 | keep | tail -8
    ;;
kernels)
    python3 bench/cpu_layer.py --shape qwen3_moe --threads 8,15,16 --memory numpy,pinned,huge,file 2>&1 | keep | tail -25
    python3 bench/cpu_layer.py --shape qwen3_moe --host-node --threads 15 --gib 1 2>&1 | keep | tail -3
    python3 bench/host_signal.py --threads 15 2>&1 | keep | tail -4
    ;;
timeline)
    for h in pool host; do
        python3 bench/decode_timeline.py "$DIR/$2-uniform.gguf" --slots 0 --tokens 32 --hand-over $h --load "$LOAD" \
            2>&1 | keep | tail -4
    done
    ;;
decode)
    bench/gpu_setup.sh wait >/dev/null || exit 1
    only=off,budget,vram; [ "$2" = deepseek_v3 ] && only=off,budget,vram,skewed
    python3 bench/offload_vs_llamacpp.py --llama-bench "$LLAMA" --shape "$2" $(layers "$2") --dir "$DIR" \
        --only "$only" --reps 2 --load "$LOAD" 2>&1 | keep | tail -6
    ;;
prefill)
    bench/gpu_setup.sh wait >/dev/null || exit 1
    python3 bench/prefill_vs_llamacpp.py --llama-bench "$LLAMA" --shape "$2" $(layers "$2") --dir "$DIR" \
        --only off --reps 2 --prompts 512,4096 --ubatches 512,2048,4096 --load "$LOAD" 2>&1 | keep | tail -8
    ;;
*)
    echo "usage: bench/gpu_round.sh files | tests | kernels | timeline SHAPE | decode SHAPE | prefill SHAPE" >&2
    exit 2
    ;;
esac
