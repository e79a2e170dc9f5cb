#!/usr/bin/env bash
# Issue 5's GPU workloads in one command, run from the repository root on the H100 machine:
#
#   OUT=$OUT JAXPAGED_GIT_REV=<hash> bash benchmarks/run_h100.sh
#
# Pass JAXPAGED_GIT_REV from the calling machine: the device's checkout reports the last
# landed commit, not the working tree that was sent.
#
# Needs python3 with jax[cuda], torch and transformers (no network, no pip: jaxpaged is
# imported from the tree through PYTHONPATH). Every phase writes its JSON into $OUT with a
# benchmarks/results-style name (<benchmark>_<model>_<card>.json); the console goes to
# $OUT/run_h100.log, and $OUT/summary.md holds issue 5's targets, met or not. At most 8
# files come back, the device tool's limit.
#
# Phases (estimated H100 time, much of it warm-up compiles; ~15 minutes all together, so split
# them over two or three calls of at most 10 minutes with the SKIP_* variables):
#   SKIP_LLAMA1B=1   llama-3.2-1b, 512 prompts, 512 in, 256 out, --compare hf     ~4-5 min
#   SKIP_QWEN3=1     qwen3-0.6b, 256 prompts, input and output uniform in 100-1024 ~2-3 min
#   SKIP_LLAMA8B=1   llama-3.1-8b, 512 prompts, 512 in, 256 out                    ~2-3 min
#   SKIP_BATCHING=1  batching experiment on llama-3.1-8b (see below)               ~6-7 min
#   SKIP_LATENCY=0   (opt-in) latency, llama-3.2-1b, batch 8, 32 in, 128 out     ~2 min
# e.g. call 1: SKIP_QWEN3=1 SKIP_LLAMA8B=1 SKIP_BATCHING=1
#      call 2: SKIP_LLAMA1B=1 SKIP_BATCHING=1
#      call 3: SKIP_LLAMA1B=1 SKIP_QWEN3=1 SKIP_LLAMA8B=1
#
# The HF peers (static `generate` at batch 64, `generate_batch`) run on the first
# HF_PROMPTS=128 of the 512 prompts: static batching's rate does not depend on the number of
# equal batches (2 of 64 here), and the full 512 would cost ~4 extra minutes at the issue's
# 974 / 1,219 tok/s. Set HF_PROMPTS=512 for the full set when time allows.
#
# Batching: the study's prompts of 512 tokens, mean output 128, caps 32/128/512/1536, shrunk
# from 1000 to BATCHING_PROMPTS=500 prompts to fit one call (~6-7 min with the 8B warm-up).
# The study's 1000 prompts take two calls, merged afterwards on any machine:
#   call A: SKIP_LLAMA1B=1 SKIP_QWEN3=1 SKIP_LLAMA8B=1 BATCHING_PROMPTS=1000 BATCHING_CAPS=32,128,512
#   call B: the same with BATCHING_CAPS=1536                                    (~5-6 min each)
#   python benchmarks/merge_batching.py A.json B.json --out results/batching_<model>_<card>.json The model is BATCHING_MODEL=llama-3.1-8b: like the
# study's OPT-13B its decode step is bound by reading weights and KV, so a larger batch is
# nearly free; on llama-3.2-1b (roofline ~2.6 ms at batch 256) the host's per-request
# bookkeeping would weigh as much as the batch size. The KV cache is limited to
# BATCHING_KV_BLOCKS=10496 blocks (167,920 usable tokens, 22 GB for the 8B): enough for 256
# requests of 512 + ~128 tokens, so paging is just at the batch limit while reserving
# prompt + cap must hold back (at cap 1536 a region is 2048 tokens: 81 requests fit). Without
# the limit, an H100's KV memory would hold nearly every reservation and the experiment would
# measure nothing. To shrink further: BATCHING_CAPS=32,512,1536.
# The study's own memory pressure (OPT-13B on a 40 GB A100 kept ~11-15k KV tokens: ~7 regions
# of 2,048 at cap 1536): BATCHING_KV_BLOCKS=938 BATCHING_CAPS=1536 BATCHING_PROMPTS=1000
# BATCHING_SCHEDULERS=reserve,paged (~4-5 min; static batching at 7 requests a batch would
# take ~13 more). benchmarks/batching_kv_sweep.py puts runs at several sizes side by side.
set -uo pipefail

OUT=${OUT:-$PWD/h100_out}
PY=${PY:-python3}
HF_PROMPTS=${HF_PROMPTS:-128}
BATCHING_PROMPTS=${BATCHING_PROMPTS:-500}
BATCHING_MODEL=${BATCHING_MODEL:-llama-3.1-8b}
BATCHING_CAPS=${BATCHING_CAPS:-32,128,512,1536}
BATCHING_KV_BLOCKS=${BATCHING_KV_BLOCKS:-10496}
BATCHING_SCHEDULERS=${BATCHING_SCHEDULERS:-static,reserve,paged}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export JAXPAGED_GIT_REV=${JAXPAGED_GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
LOG=$OUT/run_h100.log
BENCH=("$PY" -m jaxpaged.bench)
GPU_ENGINE=(--max-num-seqs 256 --max-num-batched-tokens 8192 --dtype bfloat16)

source "$(dirname "${BASH_SOURCE[0]}")/phase.sh"

{
  echo "run_h100.sh at $(date -u +%FT%TZ), git $JAXPAGED_GIT_REV"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$PY" -c 'import jax, torch, transformers; print("jax", jax.__version__, jax.devices(), "torch", torch.__version__, "transformers", transformers.__version__)'
} 2>&1 | tee -a "$LOG"

phase llama-3.2-1b SKIP_LLAMA1B "${BENCH[@]}" throughput --model llama-3.2-1b \
  --load-format dummy "${GPU_ENGINE[@]}" --num-prompts 512 --input-len 512 --output-len 256 \
  --ignore-eos --compare hf --compare-num-prompts "$HF_PROMPTS" --hf-batch-size 64 \
  --compare-timeout 420 --json "$OUT/"

phase qwen3-0.6b SKIP_QWEN3 "${BENCH[@]}" throughput --model qwen3-0.6b \
  --load-format dummy "${GPU_ENGINE[@]}" --num-prompts 256 --input-len 562 --output-len 562 \
  --range-ratio 0.822 --ignore-eos --json "$OUT/"

phase llama-3.1-8b SKIP_LLAMA8B "${BENCH[@]}" throughput --model llama-3.1-8b \
  --load-format dummy "${GPU_ENGINE[@]}" --num-prompts 512 --input-len 512 --output-len 256 \
  --ignore-eos --json "$OUT/"

phase batching SKIP_BATCHING "${BENCH[@]}" batching --model "$BATCHING_MODEL" --load-format dummy \
  "${GPU_ENGINE[@]}" --num-kv-blocks "$BATCHING_KV_BLOCKS" --num-prompts "$BATCHING_PROMPTS" \
  --input-len 512 --mean-output-len 128 --caps "$BATCHING_CAPS" \
  --schedulers "$BATCHING_SCHEDULERS" --json "$OUT/"

SKIP_LATENCY=${SKIP_LATENCY:-1}
phase latency SKIP_LATENCY "${BENCH[@]}" latency --model llama-3.2-1b --load-format dummy \
  "${GPU_ENGINE[@]}" --batch-size 8 --input-len 32 --output-len 128 --json "$OUT/"

shopt -s nullglob
results=("$OUT"/throughput_*.json "$OUT"/batching_*.json)
if ((${#results[@]})); then
  "${BENCH[@]}" summary "${results[@]}" --out "$OUT/summary.md" 2>&1 | tee -a "$LOG"
fi
echo "=== done; files in $OUT:" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
