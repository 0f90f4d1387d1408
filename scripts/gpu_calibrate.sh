#!/usr/bin/env bash
# Mixed precision across layers on the lent GPU in one device call (issue 21): the GPU suites'
# per-layer cases (the CUDA cache and model against the CPU build), the perplexity protocol for the
# uniform caches and the calibrated plans at 3.0, 3.3 and 3.5 bits per value at residual 128 and 32
# (bench/perplexity.ts --backend cuda: the plans calibrated on bytes 0..32767 of heldout.txt, every
# row evaluated on the rest), then `kivi calibrate` and `kivi perplexity --plan` once. Logs and
# results land in $OUT/calibrate.tgz after every step, the results also as
# $OUT/nvidia-*-perplexity.{json,md} and -kl.svg.
#   usage (repository root, after `source .gpu/on-device.sh`):
#     [KIVI_PREBUILT=.gpu/libkivi_cuda.so.xz] [CALIBRATION=8x512] scripts/gpu_calibrate.sh
#   KIVI_PREBUILT: a CUDA library built elsewhere for this GPU; without it the library is built here
#   for this GPU's architecture (minutes). CALIBRATION: windows x decode steps of the calibration
#   protocol (default 4x256, 1024-token windows with 512 prefilled).
set -uo pipefail
source "$(dirname "$0")/_step.sh"
step_setup calibrate
build_or_prebuilt
TAIL=14 step gpu_tests bun test --timeout=600000 tests/cache_gpu_test.ts tests/model_gpu_test.ts tests/abi_test.ts
TAIL=40 step perplexity bun bench/perplexity.ts --backend cuda --calibration "${CALIBRATION:-4x256}" --out "$r"
TAIL=10 step calibrate bun src/cli.ts calibrate --backend cuda --model ../shared/models/byte-llama-9m \
  --text ../shared/text/heldout.txt --bytes 0:32768 --budget 3.3 --residual 128 --out "$r/plan-3.3-r128.json"
TAIL=4 step plan bun src/cli.ts perplexity --backend cuda --model ../shared/models/byte-llama-9m \
  --text ../shared/text/heldout.txt --bytes 32768:319660 --plan "$r/plan-3.3-r128.json"
step_finish "$r"/*-perplexity* "$r"/plan-*.json
