#!/usr/bin/env bash
# Download (here, where the package registries are reachable) the wheels that HF `transformers serve`
# needs on the GPU host, which has no network: python 3.12, x86_64. They land in .whl/hfserve/, which
# the device tool carries with `carry: [".whl"]` (git ignores .whl/). Used by scripts/loadtest_h200.sh.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl/hfserve
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl/hfserve)
python3 -m pip download -q "${TARGET[@]}" fastapi uvicorn openai pydantic typer
# accelerate's own dependencies (torch, numpy, safetensors, huggingface_hub) are on the GPU host already.
python3 -m pip download -q --no-deps "${TARGET[@]}" accelerate psutil
ls .whl/hfserve | wc -l
