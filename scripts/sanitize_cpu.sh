#!/usr/bin/env bash
# AddressSanitizer + UBSan run of the CPU ops: configures and builds the sanitizer build in
# build/asan (CMakeLists.txt, -DFALCON_EXT_SANITIZE=ON) and runs its ctest. Pass = ctest passes
# with zero sanitizer reports (ASan and UBSan abort the test on their first report).
# Needs the project venv active (torch, ninja, and cmake >= 3.27 from `pip install cmake`).
set -euo pipefail
cd "$(dirname "$0")/.."

cmake -S . -B build/asan -G Ninja -DFALCON_EXT_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug
cmake --build build/asan -j "${JOBS:-2}"

# libtorch itself is not instrumented; ASan still checks every access our code makes.
export ASAN_OPTIONS="abort_on_error=1:detect_leaks=1:strict_string_checks=1:check_initialization_order=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
ctest --test-dir build/asan --output-on-failure
