# Sourced by the device scripts (gpu_*.sh), with $r (a folder of logs) and $archive
# (a .tgz under $OUT) set: `step NAME CMD...` runs CMD with its output in $r/NAME.log, prints its exit
# code, time and last $TAIL (default 3) lines, then archives $r, so that a call cut short still
# returns what ran.
step() {
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$r/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc in $((SECONDS - t0)) s"; tail -n "${TAIL:-3}" "$r/$name.log"
  tar czf "$archive" -C "$r" .
}

# `step build` for the device scripts: KIVI_PREBUILT (a CUDA library built elsewhere for this GPU,
# xz-compressed or not) beside a fresh CPU build, else the CUDA library built here for this GPU's
# architecture (minutes).
build_or_prebuilt() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  local arch
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  case "${KIVI_PREBUILT:-}" in
    "") step build env KIVI_CUDA_ARCH="${arch:-90}" bun build.ts --cuda ;;
    *.xz) step build bash -c "bun build.ts --cpu-only && xz -d -c '$KIVI_PREBUILT' > build/libkivi_cuda.so" ;;
    *) step build bash -c "bun build.ts --cpu-only && cp '$KIVI_PREBUILT' build/libkivi_cuda.so" ;;
  esac
}
