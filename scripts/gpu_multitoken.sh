#!/usr/bin/env bash
# Issue 17 on the lent GPU in one device call: the multi-token suite (truncate, fork, ragged
# multi-token attention and its log-sum-exp, merge, chunked prefill, the decode batch's lse: CUDA
# against the CPU build) under Bun and Deno, the decode suites whose kernels now write the LSE
# (cache, batch, abi), then bench/attention.ts's multiToken section alone against PyTorch SDPA with the
# same causal mask (where torch is installed) and the 8x32768 decode rows for an A/B of the kernels.
# Logs and results land in $OUT/multitoken.tgz after every step.
#   usage (repository root, after `source .gpu/on-device.sh` where there is one):
#     [KIVI_PREBUILT=libkivi_cuda.so[.xz]] scripts/gpu_multitoken.sh
set -uo pipefail
source "$(dirname "$0")/_step.sh"
step_setup multitoken
build_or_prebuilt
TAIL=20 step gpu_tests bun test --timeout=600000 tests/multitoken_gpu_test.ts tests/cache_gpu_test.ts \
  tests/batch_test.ts tests/abi_test.ts
TAIL=8 step gpu_tests_deno deno test -A --no-check tests/multitoken_gpu_test.ts
torch_args=()
if python3 -c "import torch" 2>/dev/null; then
  TAIL=8 step sdpa python3 bench/sdpa_reference.py "$r/sdpa.json"
  [ -s "$r/sdpa.json" ] && torch_args=(--torch "$r/sdpa.json")
fi
TAIL=10 step multitoken bun bench/attention.ts --backend cuda --multi --case none --out "$r" "${torch_args[@]}"
TAIL=12 step decode bun bench/attention.ts --backend cuda --case 8x32768 --out "$r" "${torch_args[@]}"
step_finish "$r"/*.json "$r"/*.md
