#!/usr/bin/env bash
# One device call (~8 min on an H100) that measures the stacked-weight projections (the GPU
# default since 5f8a6fe) against the old sliced-weights path, for one model:
#
#   OUT=$OUT JAXPAGED_GIT_REV=<hash from the calling machine> bash benchmarks/stacked_h100.sh
#   (MODEL=llama-3.1-8b for the device-bound model)
#
#   1. benchmarks/stacked_matmul.py --quick: the layer loop's projections alone, XLA scan
#      (copies) vs unrolled vs stacked_matmul vs the fused kernels, bandwidth vs a copy.
#   2. engine_variants.sh async-scan vs async-stacked: the whole engine, issue 5's workload.
#   3. device_profile.py with the variable set: are the memcpy128 weight copies gone?
#   4. host_phases.py --stub-device: the host's Python alone on this machine's CPU (compare
#      benchmarks/results/host_phases_stub_* from the workstation).
#   launches (only when named): stacked_matmul.py --variants launch, each of the four launches
#      a layer alone over LAUNCH_SWEEP, for LAUNCH_MODELS at LAUNCH_TOKENS.
#   throughput (only when named): issue 5's workload for MODEL, no peers, the current defaults.
#   DUMP_HLO=1 makes the profile stage also keep the engine step programs' optimized HLO
#      ($OUT/hlo_<model>.tgz), to read which small fusions and copies the step launches.
#   gpu-tests (only when named in STAGES): tests/test_stacked_matmul.py on the GPU, the real
#      Triton kernels against their references (f32 matmuls at full precision, not TF32).
# STAGES="gpu-tests kernels" picks stages (default: kernels engine profile host-stub);
# KERNEL_VARIANTS="xla-scan fused" narrows the microbenchmark.
# Each stage has its own time limit and line-buffered log, so a stage that runs over still
# leaves the others' results under $OUT.
set -uo pipefail

OUT=${OUT:-$PWD/stacked_out}
PY=${PY:-python3}
MODEL=${MODEL:-llama-3.2-1b}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export JAXPAGED_GIT_REV=${JAXPAGED_GIT_REV:-unknown}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
LOG=$OUT/stacked_h100.log

STAGES=${STAGES:-"kernels engine profile host-stub"}
KERNEL_VARIANTS=${KERNEL_VARIANTS:-"xla-scan xla-unroll stacked fused"}

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  [[ " $STAGES " == *" $name "* ]] || return 0
  echo "=== $name ($(date -u +%H:%M:%S))" | tee -a "$LOG"
  timeout "$seconds" "$@" 2>&1 | grep --line-buffered -v "Processed prompts" | tee -a "$LOG"
}

stage gpu-tests 240 env JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest \
  "$PY" -m pytest tests/test_stacked_matmul.py -q -x -p no:cacheprovider
# shellcheck disable=SC2086  # KERNEL_VARIANTS is a list
stage kernels 180 "$PY" benchmarks/stacked_matmul.py --models "$MODEL" --quick \
  --variants $KERNEL_VARIANTS --json "$OUT/"
# shellcheck disable=SC2086  # LAUNCH_MODELS and LAUNCH_TOKENS are lists
stage launches 300 "$PY" benchmarks/stacked_matmul.py --models ${LAUNCH_MODELS:-$MODEL} \
  --tokens ${LAUNCH_TOKENS:-64 256} --variants launch --min-seconds 0.3 --json "$OUT/"
stage throughput 150 "$PY" -m jaxpaged.bench throughput --model "$MODEL" --load-format dummy \
  --max-num-seqs 256 --max-num-batched-tokens 8192 --dtype bfloat16 --num-prompts 512 \
  --input-len 512 --output-len 256 --ignore-eos --json "$OUT/"
stage engine 240 env OUT="$OUT" PY="$PY" MODEL="$MODEL" VARIANTS="async-copies async-scan" \
  bash benchmarks/engine_variants.sh
HLO_DIR=$(mktemp -d)
HLO_FLAGS=()
[[ ${DUMP_HLO:-0} == 1 ]] && HLO_FLAGS=(XLA_FLAGS="--xla_dump_to=$HLO_DIR --xla_dump_hlo_as_text \
--xla_dump_hlo_module_re=.*_step.*")
stage profile 120 env "${HLO_FLAGS[@]}" "$PY" benchmarks/device_profile.py \
  --model "$MODEL" --json "$OUT/device_profile_$MODEL.json"
if [[ ${DUMP_HLO:-0} == 1 ]]; then
  (cd "$HLO_DIR" && tar czf "$OUT/hlo_$MODEL.tgz" ./*after_optimizations.txt) 2>&1 | tee -a "$LOG"
fi
stage host-stub 60 "$PY" benchmarks/host_phases.py --stub-device --model smollm2-135m \
  --num-prompts 512 --input-len 512 --output-len 256 --num-kv-blocks 13000 \
  --params-per-request --json "$OUT/host_phases_stub_device_host.json"
