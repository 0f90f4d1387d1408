#!/usr/bin/env bash
# The end-to-end decode bench on the lent GPU in one device call (issue 16): the GPU suites of its
# pieces under Bun (CUDA fill, cublasGemmEx and sequence copies against the CPU build; the model
# runner's suite, whose f32 path must not have moved), then bench/e2e.ts at Llama-3-8B's shape,
# context 32768 (bits 16, KIVI-2 and the default cache; batch 8 and each cache's largest batch).
# Logs and results land in $OUT/e2e.tgz after every step (a call cut short still returns what ran),
# the results also as $OUT/<device>-e2e.{json,md}.
#   usage (repository root, after `source .gpu/on-device.sh` where there is one):
#     [KIVI_PREBUILT=libkivi_cuda.so[.xz]] [E2E_ARGS="--layers 8"] scripts/gpu_e2e.sh
#   KIVI_PREBUILT: a CUDA library built elsewhere for this GPU; without it the library is built here
#   for this GPU's architecture (minutes). E2E_ARGS: extra options of bench/e2e.ts.
set -uo pipefail
source "$(dirname "$0")/_step.sh"
step_setup e2e
build_or_prebuilt
TAIL=14 step gpu_tests bun test --timeout=600000 tests/model_random_gpu_test.ts tests/abi_test.ts
# shellcheck disable=SC2086
TAIL=30 step e2e bun bench/e2e.ts --backend cuda --out "$r" ${E2E_ARGS:-}
step_finish "$r"/*-e2e.*
