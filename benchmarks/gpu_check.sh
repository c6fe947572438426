#!/usr/bin/env bash
# The GPU checks of issue 14 as one run, for a machine with one CUDA GPU and no network
# (the library's `device` tool). Not yet run: no GPU has been lent to a session so far.
#
# Prepare here, in the repository root (the wheels travel with `carry: [".whl"]`):
#   echo /.whl/ >> .git/info/exclude
#   pip wheel -q --no-deps -w .whl .                  # curvkit itself (pure Python)
#   pip download -q --no-deps --only-binary=:all: -d .whl \
#       curvlinops-for-pytorch==3.0.1 pyhessian==0.1 backpack-for-pytorch==1.7.1 \
#       hessian-eigenthings==1.0.0a5 einconv unfoldNd    # the peers (and BackPACK's needs)
# then run there, with a timeout that leaves room to run it again:
#   bash benchmarks/gpu_check.sh
# What comes back under $OUT: the CUDA tests' log, three `curvkit analyze --json`
# documents (CUDA float32, bfloat16 products, one NCCL process under torchrun) and the
# benchmark's RESULTS.md and results.json with the resnet section measured on the GPU
# (copy both over benchmarks/ here to record it; the other sections are kept as they were).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: no wheels in .whl (see the header)"; exit 1; }
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, curvkit; print('torch', torch.__version__, 'curvkit', curvkit.__version__)" | tee -a "$OUT/gpu.txt"

python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
for dtype in float32 bfloat16; do
    python3 -m curvkit.cli.main analyze data/digits_mlp.pt --device cuda --dtype "$dtype" --check \
        -o "/tmp/gpu-$dtype.h5" --json --quiet > "$OUT/analyze_$dtype.json"
done
python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m curvkit.cli.main analyze data/digits_mlp.pt \
    --device cuda -o /tmp/gpu-nccl.h5 --json --quiet > "$OUT/analyze_nccl.json"
python3 -m benchmarks --only resnet --device cuda 2>&1 | tail -40 | tee "$OUT/bench.log"
cp benchmarks/RESULTS.md benchmarks/results.json "$OUT/"
