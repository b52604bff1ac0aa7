#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (the reference of `sinkserve bench api --llama-server PATH`) from the
# llama.cpp vendored in the llama-cpp-python sdist, outside the repository, and print the binary's path.
#
#   scripts/build_llama_server.sh [CACHE_DIR]      (default: ~/.cache/sinkserve/llama.cpp)
#
# Idempotent: an existing binary is reused. The CPU build is portable (GGML_NATIVE=OFF); on a CPU with
# AVX-512 its kernels are switched on explicitly and AMX off (a native build stops with an illegal
# instruction on some of these hosts). Needs cmake, ninja (or make) and a C++ compiler; pip downloads
# the sdist. Environment: PYTHON (the interpreter whose pip downloads, default python3), JOBS (build jobs),
# CMAKE_EXTRA (more cmake flags, e.g. "-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" where the CPU has them).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${1:-${HOME}/.cache/sinkserve/llama.cpp}"
PYTHON="${PYTHON:-python3}"
SRC="${CACHE}/llama_cpp_python-${VERSION}/vendor/llama.cpp"
BIN="${SRC}/build/bin/llama-server"

if [[ -x "${BIN}" ]]; then
    echo "${BIN}"
    exit 0
fi

mkdir -p "${CACHE}"
if [[ ! -f "${SRC}/CMakeLists.txt" ]]; then
    SDIST="${CACHE}/llama_cpp_python-${VERSION}.tar.gz"
    if [[ ! -f "${SDIST}" ]]; then
        "${PYTHON}" -m pip download --no-deps --no-binary :all: --dest "${CACHE}" "llama-cpp-python==${VERSION}" >&2
    fi
    tar -xzf "${SDIST}" -C "${CACHE}"
fi

FLAGS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON)
if grep -q avx512f /proc/cpuinfo 2>/dev/null; then
    FLAGS+=(-DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi
if [[ -n "${CMAKE_EXTRA:-}" ]]; then
    read -r -a EXTRA <<< "${CMAKE_EXTRA}"
    FLAGS+=("${EXTRA[@]}")
fi
GENERATOR=()
if command -v ninja >/dev/null 2>&1; then
    GENERATOR=(-G Ninja)
fi

echo "configuring llama.cpp in ${SRC}: ${FLAGS[*]}" >&2
cmake -S "${SRC}" -B "${SRC}/build" "${GENERATOR[@]}" "${FLAGS[@]}" >&2
cmake --build "${SRC}/build" --target llama-server --parallel "${JOBS:-$(nproc)}" >&2
echo "${BIN}"
