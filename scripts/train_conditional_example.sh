#!/usr/bin/env bash
# Train a class-conditional DDPM on CIFAR-10 for classifier-free guidance (the README's usage example).
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python}" ddpm_main.py --conditional --epochs 30 --batch_size 64 --lr 0.003 --p_uncond 0.1 --guidance_scale 3.0 \
    --save_model --run_name DDPM_conditional_30epochs --save_dir outputs_conditional_30ep "$@"
