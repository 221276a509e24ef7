#!/usr/bin/env bash
# `make demo`: start mvllmd without systemd on its default socket, show what it serves, stop it.
# Until the rollout-job issue lands, the demo stops at `info` and `devices`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

# The daemon's default socket: $XDG_RUNTIME_DIR/mvllmd/mvllmd.sock, or /run/mvllmd/mvllmd.sock for root.
if [ -n "${XDG_RUNTIME_DIR:-}" ]; then sock="$XDG_RUNTIME_DIR/mvllmd/mvllmd.sock"; else sock=/run/mvllmd/mvllmd.sock; fi
log=$(mktemp -t mvllmd-demo.XXXXXX.log)

echo "==> starting mvllmd (embedded defaults: built-in process supervisor, socket $sock)"
echo "    declaring 2 CPU slots and 8 simulated GPUs, since this machine may have no GPU; log: $log"
"$BIN/mvllmd" --cpu-slots 2 --sim-gpus 8 2>"$log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT

for _ in $(seq 1 100); do  # up to 20 s
  if "$BIN/mvllmctl" info >/dev/null 2>&1; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then echo "mvllmd exited early:" >&2; cat "$log" >&2; exit 1; fi
  sleep 0.2
done

echo; echo "==> mvllmctl info"
"$BIN/mvllmctl" info
echo; echo "==> mvllmctl devices"
"$BIN/mvllmctl" devices
echo; echo "==> mvllmctl devices --json"
"$BIN/mvllmctl" devices --json

echo; echo "==> stopping mvllmd (SIGTERM: it drains, then exits)"
kill -TERM "$pid"
wait "$pid"
trap - EXIT
echo "done; the daemon's log was:"
sed 's/^/    /' "$log"
rm -f "$log"
