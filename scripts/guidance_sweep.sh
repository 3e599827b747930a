#!/usr/bin/env bash
# Sweep classifier-free guidance scales for one class and assemble one labelled comparison image.
#
#   scripts/guidance_sweep.sh MODEL CLASS [SCALES] [OUT_DIR] [extra ddpm_main.py flags...]
#   scripts/guidance_sweep.sh models/DDPM_conditional_30epochs/ckpt.pt cat "0 1 3 5 7" sweep_cat --sampler ddim --sampling_steps 100
#
# PYTHON names the interpreter (default: python from PATH), e.g. PYTHON=.venv/bin/python.
# Every scale uses the same seed, so rows differ only by the guidance. Writes OUT_DIR/scale_<w>/ per
# scale and OUT_DIR/guidance_sweep.png with one row per scale.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 MODEL CLASS [SCALES] [OUT_DIR] [extra flags]" >&2
    exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
model=$1; class=$2; scales=${3:-"0 1 3 5 7"}; out=${4:-guidance_sweep}
shift $(( $# < 4 ? $# : 4 ))
num=${NUM_SAMPLES:-8}
rows=()
for scale in $scales; do
    "${PYTHON:-python}" "$here/../ddpm_main.py" --inference --model_path "$model" --sample_classes "$class" --num_samples "$num" \
        --guidance_scale "$scale" --save_dir "$out/scale_$scale" "$@"
    rows+=("$out/scale_$scale:w=$scale")
done
"${PYTHON:-python}" "$here/compose_rows.py" "$out/guidance_sweep.png" "${rows[@]}"
