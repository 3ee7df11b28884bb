#!/usr/bin/env bash
# Download, here, the wheels the GPU machine's image lacks, so `bench/gpu_check.sh` can install
# them there with `pip install --no-index` (that machine reaches no package registry).
#
#   bash bench/gpu_wheels.sh              # into .cache/gpu-wheels (ignored by git: carry it)
#   bash bench/gpu_wheels.sh DIR          # somewhere else
#
# The image runs CPython 3.12 on x86-64 with torch, numpy, pillow, tokenizers, safetensors,
# httpx, tensorboard, matplotlib, pyarrow, filelock, tqdm, prometheus-client, click, h11,
# anyio, torchvision, timm, regex, huggingface-hub and pytest already
# (/work/.library/device/KINDS.md); what clipforge needs beyond those is listed below, at the
# versions of the project's own environment. --no-deps: each package's own needs are named
# here too. gpu_check.py installs a wheel only where the image lacks the package or has an
# older one, so bringing typing-extensions or annotated-doc along is harmless.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.cache/gpu-wheels}
PY=${PYTHON:-.venv/bin/python}
test -x "$PY" || PY=python3

WHEELS=(
    # the service: FastAPI on starlette and pydantic, uvicorn, multipart forms, settings
    fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0
    pydantic-settings==2.16.3 python-dotenv==1.2.4
    uvicorn==0.54.0 python-multipart==0.0.34 anyio==4.16.0
    # the index
    faiss-cpu==1.15.1
    # open_clip beside clipforge in the throughput part (its other needs are in the image)
    open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
)

mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$DEST" "${WHEELS[@]}"

# One version of each package: two wheels of one name stop the whole install there.
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
    echo "more than one wheel of: $dupes (remove the older ones from $DEST)" >&2
    exit 1
fi
ls -1 "$DEST"/*.whl | xargs -n1 basename
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST (the device tool carries at most 64 MiB with the tree)"
