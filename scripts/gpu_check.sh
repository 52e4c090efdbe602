#!/usr/bin/env bash
# The GPU acceptance check, under 10 minutes on one GPU (an H100: about 6), with the project installed:
#   1. the tests marked `cuda`: fused and flash attention (forced, bf16) with SSA and grouped queries, cached decoding,
#      bf16-mixed pretraining with float32 temperatures, resume on CUDA, bf16 fine-tuning with float32 masters;
#   2. the model and SSA-math tests on this machine;
#   3. GPT-2 124M training throughput (tokens/s, MFU against the GPU's bf16 peak) and peak memory, eager and compiled,
#      with and without SSA, and bf16 decoding (benchmarks/gpu_train.py), with the recipes' vocabulary padded to
#      50,304 and, eager, with the released 50,257;
#   4. the demo config for 20 bf16-mixed steps with SSA, and generation from it on the GPU.
# Its output goes to benchmarks/results/gpu_check-<GPU>.md (and to $OUT when set, for the device tool).
#     bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here: nothing to check')"
gpu="$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")"
record="benchmarks/results/gpu_check-${gpu}.md"
out="$(mktemp -d)"
{
    echo "# scripts/gpu_check.sh on ${gpu}, $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    echo '```'
    python -m pytest -q -m cuda tests/ 2>&1 | tail -n 15
    python -m pytest -q tests/test_model.py tests/test_ssa_math.py 2>&1 | tail -n 3
    echo '```'
    echo
    timeout 300 python benchmarks/gpu_train.py
    echo
    timeout 60 python benchmarks/gpu_train.py --no_compile --pad_vocab 1 --steps 10  # the released 50,257 rows
    echo
    echo '```'
    python pretrain/openwebtext.py --config configs/demo.yaml --ssa --train.max_steps 20 --eval.interval 10 \
        --precision bf16-mixed --out_dir "$out/demo" 2>&1 | grep -v "^training" | tail -n 6
    python generate/base.py --checkpoint_dir "$out/demo/final" --prompt "The" --max_new_tokens 20 --device cuda
    echo '```'
} 2>&1 | tee "$record"
if [ -n "${OUT:-}" ]; then cp "$record" "$OUT/"; fi
echo "Wrote $record"
