#!/usr/bin/env bash
# Prepares, on a machine with PyPI, what benchmarks/gpu.sh needs on the GPU machine, which can
# fetch nothing, in .gpu/ (git-ignored through .git/info/exclude; it travels as a carried path):
# - wheels/: the Python packages its image lacks (it has torch, torchvision, timm, pillow, numpy,
#   tqdm, safetensors, matplotlib, pytest, httpx, anyio, h11, click), as CPython 3.12 manylinux
#   wheels at the versions this virtual environment holds (a set pip resolved together:
#   pydantic's exact pydantic-core pin, for one);
# - captions_train.json: a real captions file (Flickr8k's, from ../shared) that
#   benchmarks/scale_data.py draws a COCO-shaped dataset's captions and vocabulary from.
#
#   . .venv/bin/activate && bash benchmarks/gpu_prepare.sh [CAPTIONS_FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
captions=${1:-../shared/data/flickr8k/annotations/captions_train.json}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
rm -rf .gpu && mkdir -p .gpu/wheels
cp "$captions" .gpu/captions_train.json

# captioner's own dependencies the image lacks, and the serve extra (fastapi's stack)
names=(hydra-core omegaconf pycocotools nltk fastapi starlette pydantic pydantic-core
       annotated-types typing-inspection uvicorn python-multipart sniffio)
for name in "${names[@]}"; do
    version=$(python3 -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")
    if [ -z "$version" ]; then
        echo "skip $name: not installed here (pip install -e '.[dev]' first)" >&2
        continue
    fi
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .gpu/wheels "$name==$version"
done
# omegaconf's grammar runtime is published as a source archive only: build its (pure) wheel here
python3 -m pip wheel -q --no-deps -w .gpu/wheels "antlr4-python3-runtime==$(python3 -c \
    "import importlib.metadata as m; print(m.version('antlr4-python3-runtime'))")"
du -sh .gpu && ls .gpu .gpu/wheels
