#!/usr/bin/env bash
# The kernel tests on a GPU machine: the real kernels against their references, one pytest per
# test file, each under its own time limit, so that a slow or stuck file still leaves the other
# files' results. Run from the repository root:
#
#   OUT=$OUT PART=1 bash benchmarks/gpu_tests.sh   # then PART=2 in a second device call
#
# All the kernel test files take more than one 10-minute call on an H100 (each test compiles its
# kernels; a call ran out of time at 45 %, seventeenth session), hence two parts:
#   PART=1  decode (Triton), KV write, add_rms_norm, ragged prefill
#   PART=2  decode (Mosaic GPU), argmax, stacked matmul (Triton, Mosaic GPU), LM head + argmax
# FILES="tests/test_x.py ..." runs those files instead. FILE_SECONDS (default 240) limits each
# file. PLATFORM=cpu runs the same on the CPU (a dry run of this script; interpreted kernels).
# tests/conftest.py keeps f32 matmuls at full precision (on the GPU the default, TF32, fails the
# f32 tolerances). Writes $OUT/gpu_tests.log (every file's pytest tail); prints a row per file.
set -uo pipefail

OUT=${OUT:-$PWD/gpu_tests_out}
PY=${PY:-python3}
PART=${PART:-1}
FILE_SECONDS=${FILE_SECONDS:-240}
PLATFORM=${PLATFORM:-cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
LOG=$OUT/gpu_tests.log

case $PART in
  1) DEFAULT_FILES="paged_decode_attention kv_cache_write add_rms_norm ragged_paged_attention" ;;
  2) DEFAULT_FILES="paged_decode_attention_mgpu argmax stacked_matmul stacked_matmul_mgpu
                    lm_head_argmax" ;;
  *) echo "PART=$PART; allowed: 1, 2" >&2; exit 2 ;;
esac
if [[ -z ${FILES:-} ]]; then
  FILES=$(for name in $DEFAULT_FILES; do echo "tests/test_$name.py"; done)
fi

echo "gpu_tests.sh at $(date -u +%FT%TZ), PLATFORM=$PLATFORM" | tee -a "$LOG"
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | tee -a "$LOG"
rows=()
for file in $FILES; do
  t0=$SECONDS
  result=$(JAX_PLATFORMS=$PLATFORM timeout "$FILE_SECONDS" "$PY" -m pytest "$file" -q \
    -p no:cacheprovider --tb=line -W ignore::DeprecationWarning 2>&1)
  rc=$?
  { echo "=== $file: exit $rc after $((SECONDS - t0)) s"; echo "$result" | tail -25; } >> "$LOG"
  summary=$(echo "$result" | grep -E "^[0-9]+ (passed|failed)|(passed|failed|error).* in " \
    | tail -1)
  [[ $rc == 124 ]] && summary="stopped at ${FILE_SECONDS} s: $(echo "$result" | tail -1)"
  rows+=("$(printf '%-45s %5d s  %s' "$file" $((SECONDS - t0)) "${summary:-exit $rc}")")
done
printf '%s\n' "${rows[@]}" | tee -a "$LOG"
