# Sourced by the GPU run scripts (run_h100.sh, run_tp_h100x2.sh): run one named phase of a
# longer job, appending its console to $LOG, unless its SKIP_* variable is 1.
#   phase NAME SKIP_VAR command...
phase() {
  local name=$1 skip=$2
  shift 2
  if [[ ${!skip:-0} == 1 ]]; then
    echo "=== $name: skipped ($skip=1)" | tee -a "$LOG"
    return
  fi
  echo "=== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}
