#!/usr/bin/env bash
# The GPU checks, in minutes, on a machine with CUDA: the tests marked `cuda` (fused attention and cached decoding on
# the GPU, a bf16-mixed pretraining run with SSA), the model tests, then generation from the command line.
#     bash scripts/gpu_check.sh          (in the repository, with the project installed)
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here: nothing to check')"
python -m pytest -q -m cuda tests/
python -m pytest -q tests/test_model.py tests/test_ssa_math.py
out="$(mktemp -d)"
python pretrain/openwebtext.py --config configs/demo.yaml --ssa --train.max_steps 20 --eval.interval 10 \
    --precision bf16-mixed --out_dir "$out/demo"
python generate/base.py --checkpoint_dir "$out/demo/final" --prompt "The" --max_new_tokens 20 --device cuda
