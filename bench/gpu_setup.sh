#!/usr/bin/env bash
# Prepares a bare GPU machine for the benchmarks, the same way every time.
#
#   bench/gpu_setup.sh pack     here, with the package index reachable: writes .gpu/ (git-ignored) with the wheels
#                               the GPU machine lacks and llama.cpp's source from the llama-cpp-python sdist (the
#                               version the tests pin), trimmed to what llama-bench needs (about 5 MB)
#   . bench/gpu_setup.sh run    there, from the repository root, with .gpu/ carried along: installs the wheels into
#                               /tmp/site, starts building llama-bench (CUDA, sm_90, static) in the background and
#                               exports PYTHONPATH, LLAMA_BENCH (the binary's path) and LLAMA_BUILD_LOG; also in the
#                               background, compiles the CPU kernels into numba's cache (a fresh machine compiles
#                               them for minutes on first use: timed steps would measure the compiler) by running
#                               `hybridmoe bench` on 2-layer files of both shapes, offload on CUDA, default settings
#   bench/gpu_setup.sh wait     there: waits for both (about 4.5 minutes on 16 cores) and says how they ended

LLAMA_CPP_PYTHON=0.3.36
GPU_PY=3.12

case "${1:-}" in
pack)
    rm -rf .gpu && mkdir -p .gpu
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PY" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu gguf || exit 1
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary=:all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$tmp" || exit 1
    tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    src="$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
    rm -rf "$src"/{docs,models,media,benches,tests,examples,gguf-py,conversion,tools/ui} \
        "$src"/ggml/src/ggml-{et,metal,hexagon,sycl,vulkan,opencl}
    tar cJf .gpu/llama.cpp-src.tar.xz -C "$(dirname "$src")" llama.cpp
    rm -rf "$tmp"
    du -sh .gpu
    ;;
run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl \
        || return 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    export LLAMA_BENCH=/tmp/llama.cpp/build/bin/llama-bench LLAMA_BUILD_LOG=/tmp/llama-build.log
    if [ ! -x "$LLAMA_BENCH" ]; then
        rm -rf /tmp/llama.cpp && tar xJf .gpu/llama.cpp-src.tar.xz -C /tmp
        (cd /tmp/llama.cpp && cmake -S . -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
            -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF \
            -DCMAKE_BUILD_TYPE=Release && cmake --build build --target llama-bench -j "$(nproc)") \
            >"$LLAMA_BUILD_LOG" 2>&1 &
        echo "llama-bench: building in the background (log $LLAMA_BUILD_LOG)"
    fi
    if [ ! -f /tmp/kernels-warm.done ]; then
        (set -e; for s in qwen3_moe deepseek_v3; do
            python3 bench/synthetic.py "$s" "/tmp/warm-$s.gguf" --layers 2 >/dev/null 2>&1
            python3 -m hybridmoe bench "/tmp/warm-$s.gguf" --device cuda --expert-cache-slots 0 -p 64 -n 8 -r 1
            python3 -m hybridmoe bench "/tmp/warm-$s.gguf" --device cuda -p 64 -n 8 -r 1
        done; rm -f /tmp/warm-*.gguf; touch /tmp/kernels-warm.done) >/tmp/kernels-warm.log 2>&1 &
        echo $! >/tmp/kernels-warm.pid
        echo "CPU kernels: compiling in the background (log /tmp/kernels-warm.log)"
    fi
    ;;
wait)
    while [ ! -f /tmp/kernels-warm.done ] && kill -0 "$(cat /tmp/kernels-warm.pid 2>/dev/null)" 2>/dev/null; do
        sleep 5; done
    if [ -f /tmp/kernels-warm.done ]; then echo "CPU kernels: compiled"; else
        echo "CPU kernels: warm-up failed"; tail -20 /tmp/kernels-warm.log; fi
    while [ ! -x /tmp/llama.cpp/build/bin/llama-bench ] && pgrep -f "cmake --build build" >/dev/null; do sleep 5; done
    if [ -x /tmp/llama.cpp/build/bin/llama-bench ]; then echo "llama-bench: ready"; else
        echo "llama-bench: build failed"; tail -20 /tmp/llama-build.log; exit 1; fi
    ;;
*)
    echo "usage: bench/gpu_setup.sh pack | . bench/gpu_setup.sh run | bench/gpu_setup.sh wait" >&2
    exit 2
    ;;
esac
