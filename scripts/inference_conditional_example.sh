#!/usr/bin/env bash
# Sample every CIFAR-10 class from the model of train_conditional_example.sh, then cats at three guidance scales.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/DDPM_conditional_30epochs/ckpt.pt}
"${PYTHON:-python}" ddpm_main.py --inference --conditional --model_path "$MODEL" --num_samples 40 --guidance_scale 5.0 \
    --sample_classes "0,1,2,3,4,5,6,7,8,9" --save_dir outputs_conditional_inference
for scale in 0.0 3.0 7.0; do
    "${PYTHON:-python}" ddpm_main.py --inference --conditional --model_path "$MODEL" --num_samples 10 --guidance_scale $scale \
        --sample_classes "3,3,3,3,3,3,3,3,3,3" --save_dir cats_guidance_${scale}
done
