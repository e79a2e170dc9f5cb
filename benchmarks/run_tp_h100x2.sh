#!/usr/bin/env bash
# Issue 8's GPU checks on one host with 2 H100s (device kind nvidia-h100-x2), from the
# repository root:
#
#   OUT=$OUT JAXPAGED_GIT_REV=<hash> bash benchmarks/run_tp_h100x2.sh
#
# Needs python3 with jax[cuda] (jaxpaged is imported from the tree through PYTHONPATH; no
# network, no pip). Writes into $OUT: run_tp_h100x2.log (the console), tp_greedy_*.json and
# throughput_*.json, and tp_summary.md (the 1 vs 2 GPU table). At most 8 files.
#
# Phases (estimated H100 time; ~12 minutes together, so split over two calls of at most 10
# minutes with the SKIP_* variables, e.g. call 1: SKIP_THROUGHPUT=1, call 2: SKIP_GREEDY=1
# SKIP_GREEDY_BF16=1, then SKIP_GREEDY=1 SKIP_GREEDY_BF16=1 SKIP_THROUGHPUT=1 rebuilds the
# table from the JSON files a previous call left in $OUT, if they were carried back):
#   SKIP_GREEDY=1       llama-3.1-8b dummy weights in float32 (32 GB: fits one GPU; matmuls at
#                       JAX_DEFAULT_MATMUL_PRECISION=highest, not TF32), tp 1
#                       then 2, 32 prompts of 128 tokens, 64 greedy tokens: must be
#                       identical (exit 1 otherwise)                                  ~3 min
#   SKIP_GREEDY_BF16=1  the same in bfloat16: reports how far the runs agree (a split sum
#                       adds in another order, so a near-tie may flip)                 ~2 min
#   SKIP_THROUGHPUT=1   jaxpaged-bench throughput, llama-3.1-8b bf16, 512 prompts, 512 in,
#                       256 out, --ignore-eos, at tp 1 and tp 2 (as run_h100.sh's 8B phase) ~6 min
#
# The runs at tp 1 use the first GPU only; tp 2 splits weights and KV heads over both, with
# NCCL all-reduces inserted by XLA. NVLink multicast stays off (NCCL_NVLS_ENABLE=0): the
# device machines require it.
set -uo pipefail

OUT=${OUT:-$PWD/tp_h100x2_out}
PY=${PY:-python3}
MODEL=${MODEL:-llama-3.1-8b}
NUM_PROMPTS=${NUM_PROMPTS:-512}
TPS=${TPS:-"1 2"}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export JAXPAGED_GIT_REV=${JAXPAGED_GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export NCCL_NVLS_ENABLE=0
LOG=$OUT/run_tp_h100x2.log
GPU_ENGINE=(--max-num-seqs 256 --max-num-batched-tokens 8192 --dtype bfloat16)

source "$(dirname "${BASH_SOURCE[0]}")/phase.sh"

{
  echo "run_tp_h100x2.sh at $(date -u +%FT%TZ), git $JAXPAGED_GIT_REV"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'
} 2>&1 | tee -a "$LOG"

JAX_DEFAULT_MATMUL_PRECISION=highest \
  phase greedy-f32 SKIP_GREEDY "$PY" benchmarks/tp_greedy.py --model "$MODEL" \
  --load-format dummy --dtype float32 --tp 1,2 --json "$OUT/tp_greedy_${MODEL}_f32.json"
phase greedy-bf16 SKIP_GREEDY_BF16 "$PY" benchmarks/tp_greedy.py --model "$MODEL" \
  --load-format dummy --dtype bfloat16 --tp 1,2 --json "$OUT/tp_greedy_${MODEL}_bf16.json"
for TP in $TPS; do
  phase "throughput-tp$TP" SKIP_THROUGHPUT "$PY" -m jaxpaged.bench throughput --model "$MODEL" \
    --load-format dummy "${GPU_ENGINE[@]}" --tensor-parallel-size "$TP" \
    --num-prompts "$NUM_PROMPTS" --input-len 512 --output-len 256 --ignore-eos \
    --json "$OUT/throughput_${MODEL}_tp${TP}.json"
done

"$PY" - "$OUT" "$MODEL" $TPS <<'EOF' 2>&1 | tee "$OUT/tp_summary.md" | tee -a "$LOG"
import json, sys
from pathlib import Path

out, model, tps = Path(sys.argv[1]), sys.argv[2], [int(t) for t in sys.argv[3:]]
print(f"## {model}, dummy weights, bf16: {' vs '.join(map(str, tps))} GPUs (tensor "
      f"parallelism; speed-up and efficiency against the first size)\n")
print("| GPUs | req/s | output tok/s | total tok/s | seconds | speed-up | scaling efficiency "
      "| steady decode ms/step | compiles after warm-up |")
print("|---|---|---|---|---|---|---|---|---|")
base = None
for tp in tps:
    f = out / f"throughput_{model}_tp{tp}.json"
    if not f.is_file():
        print(f"| {tp} | (no {f.name}) ||||||||")
        continue
    r = json.loads(f.read_text())
    if base is None:
        base, base_tp = r["output_tokens_per_s"], tp
    sd = r.get("steady_decode") or {}
    step = sd.get("step_s", {}).get("p50")
    print(f"| {tp} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.0f} | "
          f"{r['total_tokens_per_s']:.0f} | {r['elapsed_s']:.1f} | "
          f"{r['output_tokens_per_s'] / base:.2f}x | "
          f"{r['output_tokens_per_s'] / base / (tp / base_tp):.0%} | "
          f"{'-' if step is None else f'{step * 1e3:.2f}'} | {r['compiles_after_warmup']} |")
for dtype in ("f32", "bf16"):
    f = out / f"tp_greedy_{model}_{dtype}.json"
    if f.is_file():
        r = json.loads(f.read_text())["by_tp"]["2"]
        print(f"\ngreedy {dtype}, tp 2 vs tp 1: {r['identical_prompts']}/{r['num_prompts']} "
              f"prompts identical; first differences at {r['first_difference_positions']}; "
              f"max |d cumulative logprob| {r['max_abs_cumulative_logprob_diff']:.3g}")
EOF
