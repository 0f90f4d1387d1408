# Sourced by the device scripts (gpu_*.sh), with $r (a folder of logs) and $archive
# (a .tgz under $OUT) set, by hand or by `step_setup`: `step NAME CMD...` runs CMD with its output in $r/NAME.log, prints its exit
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

# `step_setup NAME` for the device scripts: logs in $r=/tmp/NAME, results in $out ($OUT, else
# build/gpu-out), both archived as $out/NAME.tgz after every step.
step_setup() {
  r=/tmp/$1
  out="${OUT:-build/gpu-out}"
  mkdir -p "$r" "$out" build
  archive="$out/$1.tgz"
}

# `step_finish FILE...`: the results (FILE..., those that exist) copied beside the archive, the logs
# archived a last time, and $out listed.
step_finish() {
  cp "$@" "$out"/ 2>/dev/null
  tar czf "$archive" -C "$r" .
  ls -la "$out"
}
