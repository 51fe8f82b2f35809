#!/usr/bin/env bash
# Train the demo model on a lent GPU machine (see the device tool's README); everything lands in $OUT.
# Usage there: bash scripts/device_train_demo.sh VAE_SECONDS UNET_SECONDS
set -euo pipefail
# a venv over the machine's torch with the carried wheels; `python -m` finds this project in the working directory
python3 -m venv --system-site-packages /tmp/venv
/tmp/venv/bin/python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl
export PATH=/tmp/venv/bin:$PATH PYTHONUNBUFFERED=1
nvidia-smi -L || true
python -m unlearn_core.demo.quality train-classifier --out "$OUT/flag-classifier.safetensors" --steps 4000 --time-budget-s 35 2>&1 | tee "$OUT/classifier.log"
python -m unlearn_core.demo.train --out /tmp/demo-model --work /tmp/demo-work \
  --vae-steps 20000 --vae-batch 128 --vae-time-budget-s "${1:-90}" \
  --unet-steps 1000000 --unet-batch 256 --unet-lr 1e-3 --unet-time-budget-s "${2:-300}" \
  --checkpoint-every-s 60 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | awk 'NR%50==1' > "$OUT/train.log"
cp /tmp/demo-model/training_report.json "$OUT/" 
tar czf /tmp/demo-model.tgz -C /tmp demo-model && split -b 15M /tmp/demo-model.tgz "$OUT/demo-model.tgz.part-"
python -m unlearn_core.demo.quality check --model /tmp/demo-model --classifier "$OUT/flag-classifier.safetensors" --seeds 16 --out "$OUT/quality" 2>&1 | tail -5
cp "$OUT/quality/quality.json" "$OUT/quality.json"; cp "$OUT/quality/samples.png" "$OUT/samples.png"; rm -r "$OUT/quality"
