#!/usr/bin/env bash
# The model runner on the lent GPU in one device call (issue 15): the model's GPU suite under Bun
# (CPU vs CUDA log-probabilities, the card's 1.8206 bits per byte at bits 16, the ABI of both
# builds), the full perplexity protocol for the five caches at residual 128 and 32
# (bench/perplexity.ts --backend cuda), and `kivi generate` once. Logs and results land in
# $OUT/model.tgz after every step (a call cut short still returns what ran), the results also as
# $OUT/nvidia-*-perplexity.{json,md}.
#   usage (repository root, after `source .gpu/on-device.sh`, which puts bun on PATH and links the
#   model and text as ../shared):
#     [KIVI_PREBUILT=.gpu/libkivi_cuda.so.xz] scripts/gpu_model.sh
#   KIVI_PREBUILT: a CUDA library built elsewhere for this GPU (xz-compressed or not); without it the
#   library is built here for this GPU's architecture (minutes).
set -uo pipefail
source "$(dirname "$0")/_step.sh"
step_setup model
ls /usr/local/cuda/lib64/libcublas.so.13 || echo "no libcublas.so.13 in /usr/local/cuda/lib64: kivi_model_linear will say so"
build_or_prebuilt
TAIL=14 step gpu_tests bun test --timeout=600000 tests/model_gpu_test.ts tests/abi_test.ts
TAIL=16 step perplexity bun bench/perplexity.ts --backend cuda --out "$r"
TAIL=3 step generate bun src/cli.ts generate --backend cuda --model ../shared/models/byte-llama-9m \
  --prompt "The President said that the" --max-tokens 200
step_finish "$r"/*-perplexity.*
