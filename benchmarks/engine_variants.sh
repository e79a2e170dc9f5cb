#!/usr/bin/env bash
# The engine's decode-step options side by side on one GPU, same workload and same machine
# (issue 5's llama-3.2-1b workload: 512 prompts, 512 in, 256 out, EOS ignored):
#
#   OUT=$OUT JAXPAGED_GIT_REV=<hash> bash benchmarks/engine_variants.sh
#
#   async-scan    step N + 1 dispatched while step N runs, layers in a lax.scan in every step
#                 (JAXPAGED_UNROLL_LAYERS=0); otherwise the defaults (on a GPU that includes
#                 the stacked-weight projections since 5f8a6fe and, since 5e9c6b6, the in-place
#                 cuBLAS GEMMs of jaxpaged.xla_flags). The GPU default since 82959ca unrolls
#                 decode steps: that is async-unroll-decode
#   async-copies  JAXPAGED_STACKED_MATMUL=0: the scan slices (copies) each layer's weights out
#                 of the stacks for XLA's GEMMs, the default before 5f8a6fe
#   sync-scan     --no-async-scheduling: the host waits for each step before planning the next
#   async-unroll  JAXPAGED_UNROLL_LAYERS=1: the layer loop unrolled (slow to compile)
#   async-unroll-decode  JAXPAGED_UNROLL_LAYERS=decode: unrolled in decode-only steps only
#   async-graphs  the defaults with while loops (the layer scan) and conditionals in XLA's CUDA
#                 graphs (command buffers) too, so the host launches fewer kernels a step
#   async-decode-graphs  the defaults (decode steps unrolled) with every kernel kind but loops
#                 in XLA's command buffers and no minimum graph size: an unrolled decode step
#                 has no while loop, so its launches can all go into graphs (+26% in one
#                 A/B at bb228db, inside the host's run-to-run spread of the same code:
#                 not adopted; see jaxpaged/xla_flags.py)
#   async-dsf     the defaults with XLA's dynamic-slice fusion: a GEMM reads its layer's slice
#                 of the stacked weights in place instead of the scan copying it out first
#                 (measured: no effect, the copies stay)
#   async-dsf-cublas  the same with Triton GEMM fusions off, so every GEMM is a cuBLAS call,
#                 the kind dynamic-slice fusion handles (measured at 9fa7cf7, then made the
#                 default: jaxpaged.xla_flags adds both flags, so both variants now equal
#                 async-scan unless JAXPAGED_XLA_FLAGS=0)
#   async-stacked the defaults with JAXPAGED_STACKED_MATMUL=1: in decode-only steps the seven
#                 projections read their layer's weights in place from the stacks (Pallas
#                 stacked_matmul) instead of the scan copying them out (the GPU default now)
#
# Each writes $OUT/variant_<name>.json; the last lines are one row per variant (steady decode
# at the largest batch: step time, host busy time, wait for the device, roofline ratio).
# VARIANTS="async-scan sync-scan" picks some; ~1-2 minutes each on an H100 (async-unroll ~6).
# MODEL=llama-3.1-8b for a model whose decode step is bound by the device. NUM_KV_BLOCKS fixes
# the KV cache's size (default: sized from the free memory, as the engine does).
set -uo pipefail

OUT=${OUT:-$PWD/variants_out}
PY=${PY:-python3}
MODEL=${MODEL:-llama-3.2-1b}
VARIANTS=${VARIANTS:-"async-scan sync-scan async-unroll-decode"}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export JAXPAGED_GIT_REV=${JAXPAGED_GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
LOG=$OUT/engine_variants.log
GRAPH_FLAGS='--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1'
DECODE_GRAPH_FLAGS='--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN --xla_gpu_graph_min_graph_size=1'

for v in $VARIANTS; do
  flags=()
  unroll=0
  stacked=${JAXPAGED_STACKED_MATMUL:-}
  [[ $v == sync* ]] && flags+=(--no-async-scheduling)
  [[ $v == *unroll ]] && unroll=1
  [[ $v == *unroll-decode || $v == *decode-graphs ]] && unroll=decode
  [[ $v == *stacked ]] && stacked=1
  [[ $v == *copies ]] && stacked=0
  xla_flags=${XLA_FLAGS:-}
  if [[ $v == *decode-graphs ]]; then xla_flags+=" $DECODE_GRAPH_FLAGS"
  elif [[ $v == *graphs ]]; then xla_flags+=" $GRAPH_FLAGS"; fi
  [[ $v == *dsf* ]] && xla_flags+=" --xla_gpu_enable_dynamic_slice_fusion=true"
  [[ $v == *cublas ]] && xla_flags+=" --xla_gpu_enable_triton_gemm=false"
  echo "=== $v" | tee -a "$LOG"
  env XLA_FLAGS="$xla_flags" JAXPAGED_UNROLL_LAYERS=$unroll ${stacked:+JAXPAGED_STACKED_MATMUL=$stacked} "$PY" -m jaxpaged.bench throughput --model "$MODEL" \
    --load-format dummy --max-num-seqs 256 --max-num-batched-tokens 8192 --dtype bfloat16 \
    ${NUM_KV_BLOCKS:+--num-kv-blocks "$NUM_KV_BLOCKS"} --num-prompts "${NUM_PROMPTS:-512}" --input-len "${INPUT_LEN:-512}" \
    --output-len "${OUTPUT_LEN:-256}" --ignore-eos "${flags[@]}" --json "$OUT/variant_$v.json" 2>&1 \
    | grep --line-buffered -v "Processed prompts" | tee -a "$LOG"
done

"$PY" - "$OUT" <<'PY' | tee -a "$LOG"
import json, pathlib, sys
print(f"{'variant':14} {'out tok/s':>10} {'warm-up s':>9} {'step ms':>8} {'host ms':>8} "
      f"{'wait ms':>8} {'roofline ms':>11} {'step/roof':>9}")
for p in sorted(pathlib.Path(sys.argv[1]).glob("variant_*.json")):
    r = json.loads(p.read_text())
    sd, rl = r.get("steady_decode") or {}, (r.get("steady_decode") or {}).get("roofline") or {}
    ms = lambda k: sd.get(k, {}).get("p50", float("nan")) * 1e3
    print(f"{p.stem[8:]:14} {r['output_tokens_per_s']:10.0f} {r['engine']['warmup_s']:9.1f} "
          f"{ms('step_s'):8.2f} {ms('host_s'):8.2f} {ms('wait_s'):8.2f} "
          f"{rl.get('roofline_s', float('nan')) * 1e3:11.2f} {rl.get('step_over_roofline', float('nan')):9.2f}")
PY
