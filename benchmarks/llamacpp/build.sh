#!/usr/bin/env bash
# Builds llama.cpp's `llama-bench` (and `llama-simple`/`llama-tokenize`, for the greedy-token and
# tokenizer checks) on this CPU,
# from the llama.cpp source vendored in the `llama-cpp-python` sdist on PyPI (the only registry
# route to llama.cpp's source here). Idempotent: a finished build is reused; prints the
# llama.cpp version/commit either way.
#   Cache: $LLAMACPP_DIR (default .mlx/llama.cpp, git-ignored):
#     venv/               cmake + scikit-build-core (the sdist's build backend, needed by pip download)
#     sdist/              the downloaded llama_cpp_python-$VERSION.tar.gz
#     src/                its extraction; src/llama.cpp = vendor/llama.cpp (incl. gguf-py)
#     build-<isa>/bin/    llama-bench, llama-simple, llama-tokenize (GGML_NATIVE=ON: one build per ISA, since this
#                         VM's CPU changes between sessions: AVX-512 on one day, AVX2 on another)
#   env: LLAMA_CPP_PYTHON_VERSION (0.3.36), JOBS (2), NICE (10).
# Prints `LLAMACPP_BIN=<dir>` and `GGUF_PY=<dir>` as its last lines.
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
LL=${LLAMACPP_DIR:-.mlx/llama.cpp}
JOBS=${JOBS:-2}
NICE=${NICE:-10}
mkdir -p "$LL"
LL=$(cd "$LL" && pwd)
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
if [[ " $flags " == *" avx512f "* && " $flags " == *" avx512bw "* ]]; then ISA=avx512
elif [[ " $flags " == *" avx2 "* ]]; then ISA=avx2
else ISA=$(uname -m); fi
SRC=$LL/src/llama.cpp
BUILD=$LL/build-$ISA
BIN=$BUILD/bin
TARGETS="llama-bench llama-simple llama-tokenize"
need=0
for t in $TARGETS; do [ -x "$BIN/$t" ] || need=1; done

if [ "$need" = 1 ]; then
  t0=$(date +%s)
  if [ ! -x "$LL/venv/bin/python" ]; then
    python3 -m venv "$LL/venv"
    "$LL/venv/bin/pip" install --quiet --disable-pip-version-check cmake==3.31.6 scikit-build-core==0.11.6
  fi
  export PATH=$LL/venv/bin:$PATH
  if [ ! -f "$SRC/CMakeLists.txt" ]; then
    mkdir -p "$LL/sdist"
    ls "$LL"/sdist/llama_cpp_python-"$VERSION".tar.gz >/dev/null 2>&1 \
      || "$LL/venv/bin/pip" download --quiet --disable-pip-version-check --no-deps --no-build-isolation \
           --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$LL/sdist"
    rm -rf "$LL/src" && mkdir -p "$LL/src"
    tar -xzf "$LL/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$LL/src"
    ln -sfn "llama_cpp_python-$VERSION/vendor/llama.cpp" "$SRC"
  fi
  # Release, native ISA, no server/tests/examples/tools beyond what is built below; no curl.
  nice -n "$NICE" cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON -DGGML_OPENMP=ON >"$LL/cmake-$ISA.log"
  nice -n "$NICE" cmake --build "$BUILD" --config Release -j "$JOBS" --target $TARGETS \
    >>"$LL/build-$ISA.log"
  # Seconds of this build step (the first, full build is the one that counts; later ones add).
  echo "$(( $(date +%s) - t0 ))" >> "$BUILD/.build_seconds"
fi
"$BIN/llama-bench" --version 2>&1 | grep -iE 'version|built' || true
echo "llama-cpp-python $VERSION sdist; ISA $ISA; build seconds $(paste -sd+ "$BUILD/.build_seconds" 2>/dev/null || echo '?') (nice $NICE, -j$JOBS)"
echo "LLAMACPP_BIN=$BIN"
echo "GGUF_PY=$SRC/gguf-py"
