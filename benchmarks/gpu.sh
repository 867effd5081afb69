#!/usr/bin/env bash
# Issue 24 on a CUDA machine in one command: the CUDA tests, torchrun, and the first measurement
# (training from the feature cache at data=coco: the product against a bare PyTorch loop), every
# line of it in one report, $OUT/gpu.txt ($OUT: the device tool's folder; else ./gpu-out).
#
# Here, first (PyPI reachable): bash benchmarks/gpu_prepare.sh   -> .gpu/ (git-ignored)
# Then on the GPU machine, from the repository's root, carrying .gpu:
#   bash benchmarks/gpu.sh       (the device tool: run(command=..., carry=[".gpu"]))
# Without a GPU, GPU_SH_DEVICE=cpu GPU_SH_IMAGES=64 bash benchmarks/gpu.sh checks the script itself
# (the CUDA tests then run on the CPU, CAPTIONER_TEST_DEVICE=cpu).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
REPORT=$OUT/gpu.txt
: >"$REPORT"
WORK=${GPU_WORK:-/tmp/captioner-gpu}
DEVICE=${GPU_SH_DEVICE:-cuda}
IMAGES=${GPU_SH_IMAGES:-10000}
export PYTHONUNBUFFERED=1

section() { printf '\n== %s (%s UTC)\n' "$1" "$(date -u +%H:%M:%S)" | tee -a "$REPORT"; }
step() { # step SECONDS COMMAND...: its output into the report, then its exit status (124: it
    # ran past SECONDS and was stopped, so a hang costs one step, not the device call); never stop
    local limit=$1
    shift
    timeout "$limit" "$@" 2>&1 | tee -a "$REPORT"
    echo "exit status ${PIPESTATUS[0]}: $*" | tee -a "$REPORT"
}

section "machine and packages"
if ! python3 -c "import hydra, pycocotools, nltk" 2>/dev/null; then
    [ -d .gpu/wheels ] || { echo "no .gpu/wheels: run benchmarks/gpu_prepare.sh first" | tee -a "$REPORT"; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/captioner-site .gpu/wheels/*.whl 2>&1 | tee -a "$REPORT"
    export PYTHONPATH=/tmp/captioner-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
command -v nvidia-smi >/dev/null && step 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step 60 python3 -c "import sys, torch, captioner.cli, hydra, pycocotools, nltk, fastapi, uvicorn
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

section "CUDA tests (tests/test_cuda.py)"
[ "$DEVICE" = cpu ] && export CAPTIONER_TEST_DEVICE=cpu
step 200 python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider \
    -o addopts="-ra --strict-markers"

section "torchrun: one process trains the demo for an epoch on $DEVICE"
step 90 torchrun --standalone --nproc_per_node=1 -m captioner train device="$DEVICE" \
    data.root="$WORK/demo" trainer.max_epochs=1 trainer.cache_dir="$WORK/cache" \
    hydra.run.dir="$WORK/torchrun"

section "training from the feature cache at data=coco: the product vs a bare loop"
# a COCO-shaped set (benchmarks/scale_data.py): $IMAGES images, 5 captions each drawn from a real
# captions file with Zipf-ranked rare words, so the vocabulary (the output layer) grows as COCO's
step 60 python3 -c "import argparse, sys; from pathlib import Path; sys.path.insert(0, 'benchmarks')
from scale_data import make_dataset
make_dataset(argparse.Namespace(root=Path('$WORK/coco_shaped'), sizes=[$IMAGES], val=8,
             captions=Path('.gpu/captions_train.json'), rare_fraction=0.2, image_size=224))"
step 200 python3 benchmarks/train_throughput.py --preset coco --device "$DEVICE" \
    --coco-annotations "$WORK/coco_shaped/captions_train_$IMAGES.json" \
    --images "$WORK/coco_shaped/images" --num-images "$IMAGES" --num-workers 8 \
    --json "$OUT/train_throughput.json"

section "done"
echo "report: $REPORT" | tee -a "$REPORT"
