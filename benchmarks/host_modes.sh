#!/usr/bin/env bash
# The same llama-3.2-1b workload (issue 5's: 512 prompts, 512 in, 256 out, EOS ignored) run
# RUNS times in fresh processes on one GPU machine, one row per run: on an H100 lease the
# host's time a decode step fell into two modes for identical code (3.2 and 3.7 ms in 2 of 12
# runs, 5.0-6.2 ms in 10; benchmarks/NOTES_engine.md, seventh session). Each row splits the
# step's host time (the runner's dispatch, and in it the jitted forward's call) and gives the
# main thread's CPU time and context switches over the run, to tell a main thread that works
# more from one that blocks or is pushed off its core.
#
#   OUT=$OUT JAXPAGED_GIT_REV=<hash> bash benchmarks/host_modes.sh
#
# RUNS=4 by default (~1 minute each once the compilation cache is warm). PIN=1 adds as many
# runs again under `taskset -c $PIN_CPU` (default 2: every thread of the process on one core;
# shows whether placement decides the mode). EXTRA_ENV="VAR=value ..." is set for every run.
# VARIANTS="name:VAR=value,VAR=value name2:..." makes it an A/B: each of the RUNS rounds runs
# every variant once, in turn (interleaved, so a host that changes speed mid-call hits all of
# them), e.g. VARIANTS="base:JAXPAGED_DISPATCH_THREAD=0 thread:JAXPAGED_DISPATCH_THREAD=1";
# a setting that starts with -- is a flag of the benchmark instead, e.g.
# VARIANTS="k1: k8:--num-scheduler-steps=8". For a dry run
# on the CPU: MODEL_ARGS= WORKLOAD="--num-prompts 4 --input-len 16 --output-len 8" (the
# embedded SmolLM2).
set -uo pipefail

OUT=${OUT:-$PWD/host_modes_out}
PY=${PY:-python3}
RUNS=${RUNS:-4}
MODEL_ARGS=${MODEL_ARGS-"--model llama-3.2-1b --load-format dummy --dtype bfloat16"}
WORKLOAD=${WORKLOAD:-"--num-prompts 512 --input-len 512 --output-len 256"}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export JAXPAGED_GIT_REV=${JAXPAGED_GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
LOG=$OUT/host_modes.log

run() {  # run NAME [command prefix...]; $FLAGS: extra benchmark flags
  local name=$1
  shift
  echo "=== $name" | tee -a "$LOG"
  # shellcheck disable=SC2086  # the *_ARGS variables are word lists
  env ${EXTRA_ENV:-} "$@" "$PY" -m jaxpaged.bench throughput $MODEL_ARGS ${FLAGS:-} \
    --max-num-seqs 256 --max-num-batched-tokens 8192 $WORKLOAD --ignore-eos \
    --json "$OUT/host_modes_$name.json" 2>&1 | grep --line-buffered -v "Processed prompts" \
    | tee -a "$LOG" | grep "steady decode\|main thread"
  [[ -f $OUT/host_modes_$name.json ]] || echo "  no result: see the end of $LOG"
}

for i in $(seq 1 "$RUNS"); do
  for variant in ${VARIANTS:-r:}; do
    settings=() FLAGS=""
    IFS=, read -ra words <<< "${variant#*:}"
    for word in "${words[@]}"; do
      if [[ $word == --* ]]; then FLAGS+=" ${word/=/ }"; else settings+=("$word"); fi
    done
    run "${variant%%:*}$i" env "${settings[@]}"
  done
done
if [[ ${PIN:-0} == 1 ]]; then
  for i in $(seq 1 "$RUNS"); do run "pinned$i" taskset -c "${PIN_CPU:-2}"; done
fi

"$PY" - "$OUT" <<'PY' | tee -a "$LOG"
import json, pathlib, sys
print(f"{'run':9} {'tok/s':>7} {'step':>6} {'host':>6} {'dispatch':>8} {'forward':>7} "
      f"{'wait':>6} {'thread CPU/wall':>15} {'vol sw':>7} {'invol sw':>8} {'py ms before/after':>18}")
for p in sorted(pathlib.Path(sys.argv[1]).glob("host_modes_*.json")):
    r = json.loads(p.read_text())
    sd, t = r["steady_decode"], r.get("main_thread") or {}
    ms = lambda k: sd.get(k, {}).get("p50", float("nan")) * 1e3
    print(f"{p.stem[11:]:9} {r['output_tokens_per_s']:7.0f} {ms('step_s'):6.2f} "
          f"{ms('host_s'):6.2f} {ms('dispatch_s'):8.2f} {ms('forward_dispatch_s'):7.2f} "
          f"{ms('wait_s'):6.2f} {t.get('cpu_s', 0):7.2f}/{t.get('wall_s', 0):<7.2f} "
          f"{t.get('voluntary_switches', -1):7d} {t.get('involuntary_switches', -1):8d} "
          f"{r.get('host_python_ms', float('nan')):8.1f}/{r.get('host_python_ms_after', float('nan')):<9.1f}")
PY
