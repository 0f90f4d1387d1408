# Sourced by the device scripts (gpu_final.sh, gpu_model.sh), with $r (a folder of logs) and $archive
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
