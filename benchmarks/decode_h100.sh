#!/usr/bin/env bash
# One device call for the decode-attention kernel at the engine's batch-256 shapes:
#
#   OUT=$OUT JAXPAGED_GIT_REV=<hash> bash benchmarks/decode_h100.sh
#
#   1. decode_variants.py: VARIANTS (default: all) in ROUNDS interleaved rounds, MODELS' shapes.
#   2. ncu (Nsight Compute, when present and able to read counters) on NCU_VARIANTS at the 1B
#      shape: speed of light, occupancy, warp states, memory workload; text into $OUT.
set -uo pipefail

OUT=${OUT:-$PWD/decode_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export JAXPAGED_GIT_REV=${JAXPAGED_GIT_REV:-unknown}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export PYTHONUNBUFFERED=1
VARIANTS=${VARIANTS:-}
ROUNDS=${ROUNDS:-3}
MODELS=${MODELS:-llama-3.2-1b,llama-3.1-8b}
NCU_VARIANTS=${NCU_VARIANTS:-base,mgpu}
TAG=${TAG:-}
EXTRA=${EXTRA:-0}  # kv_lens = context + EXTRA

nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
timeout "${VARIANTS_SECONDS:-300}" "$PY" benchmarks/decode_variants.py ${VARIANTS:+--variants "$VARIANTS"} \
  --rounds "$ROUNDS" --models "$MODELS" --out "$OUT" --tag "$TAG" --extra-tokens "$EXTRA" 2>&1 | tee "$OUT/decode_variants$TAG.log"
if [ -n "$NCU_VARIANTS" ] && command -v ncu >/dev/null; then
  timeout "${NCU_SECONDS:-200}" ncu --clock-control none -k regex:paged_decode \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
    --section MemoryWorkloadAnalysis --section SchedulerStats \
    "$PY" benchmarks/decode_variants.py --profile-only --variants "$NCU_VARIANTS" \
    --models llama-3.2-1b --extra-tokens "$EXTRA" > "$OUT/ncu_decode$TAG.txt" 2>&1
  echo "ncu exit $?"
  grep -E "^  paged_decode|DRAM Throughput|Achieved Occupancy|Registers Per|Dynamic Shared|Duration" \
    "$OUT/ncu_decode$TAG.txt" | awk '/paged_decode/{n++; if (n % 3 != 1) skip=1; else skip=0} !skip' | head -60
fi
