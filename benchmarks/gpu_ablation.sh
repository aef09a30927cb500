#!/usr/bin/env bash
# Issue 26's ablation at the full schedule in one call of a lent GPU machine: benchmarks/synthetic_ablation.py
# (paper Tables 2-4 in miniature) for the four variants at 6,000 steps, side by side on the one GPU (--jobs 4),
# each then scored on the 2,768 test sentences. On a GPU the trainer takes the authors' AMP (fp16 + grad scaler), so
# these runs are comparable with one another, not step for step with the fp32 CPU runs.
#
# The device image has PyTorch but neither pycocotools nor the lite preset's weight packages, and a call
# carries at most 64 MiB, so prepare once here, in the repository root (.gpu/ is git-ignored):
#   bash benchmarks/gpu_ablation.sh prepare
# which writes .gpu/minilm (MiniLM-L6's BERT folder, weights in fp16: 45 MB), .gpu/efficientnet-lite2.pth
# (ImageNet weights in fp16: 12 MB) and the pycocotools wheel for the device's Python 3.12. Then run
#   bash benchmarks/gpu_ablation.sh
# there carrying .gpu (timeout ~590 s). Results land in $OUT when set (the device tool's folder), else in
# runs/gpu-ablation: RESULTS.md, results.json, differences.json, each variant's eval-test.json / log.jsonl /
# plots.png / console.txt.
# Knobs (environment): STEPS (6000), SEED (0), VARIANTS ("linguistic learnable-k1 learnable-k10 pwam"),
# HOURS (0.12: no training turn of CHUNK (500) steps starts after that, so that the call ends with the scores
# of wherever the variants stand, marked mid-schedule, before the device's 10-minute limit), DEVICE (cuda),
# TRAIN_REFS (12000), TEST_REFS (1000), EXTRA (more --set overrides, e.g. for a toy run on a CPU).
set -uo pipefail

if [ "${1:-}" = prepare ]; then
  mkdir -p .gpu
  python3 - <<'EOF' || exit 1
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lgformer.model.efficientnet import default_weights_path
from lgformer.safe_load import load_torch_file
from lgformer.text.tokenizer import minilm_path

src, dst = minilm_path(), Path(".gpu/minilm")
dst.mkdir(parents=True, exist_ok=True)
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(src / name, dst / name)
weights = {k: v.half() if v.is_floating_point() else v for k, v in load_file(src / "model.safetensors").items()}
save_file(weights, dst / "model.safetensors")
state = load_torch_file(default_weights_path(), "EfficientNet-Lite2 weights")
torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, ".gpu/efficientnet-lite2.pth")
EOF
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu pycocotools || exit 1
  du -sh .gpu
  exit 0
fi

out=${OUT:-runs/gpu-ablation}
runs=/tmp/gpu-ablation
mkdir -p "$out" "$runs"
source benchmarks/gpu_env.sh "$out"
steps=${STEPS:-6000} seed=${SEED:-0} device=${DEVICE:-cuda}
variants=(${VARIANTS:-linguistic learnable-k1 learnable-k10 pwam})
workers=$(( ($(nproc) - ${#variants[@]}) / ${#variants[@]} ))
[ "$workers" -lt 1 ] && workers=1

data=$runs/synth
python3 -m lgformer.cli data synth --out "$data" --train "${TRAIN_REFS:-12000}" --val 1000 \
  --test "${TEST_REFS:-1000}" --seed 0 >"$out/data.txt" 2>&1 || { tail -3 "$out/data.txt"; exit 1; }
sets=(--set data.image_size=256 --set train.val_split=null --set "train.workers=$workers"
      --set model.text_encoder=.gpu/minilm --set model.backbone_weights=.gpu/efficientnet-lite2.pth)
for item in ${EXTRA:-}; do sets+=(--set "$item"); done
start=$(date +%s)
python3 benchmarks/synthetic_ablation.py --out "$runs" --data "$data" --steps "$steps" --seed "$seed" \
  --variants "$(IFS=,; echo "${variants[*]}")" --jobs "${#variants[@]}" --device "$device" \
  --chunk "${CHUNK:-500}" --hours "${HOURS:-0.12}" "${sets[@]}" >"$out/ablation.txt" 2>&1
echo "wall time $(( $(date +%s) - start )) s for ${#variants[@]} variants side by side" | tee -a "$out/gpu.txt"
for v in "${variants[@]}"; do
  mkdir -p "$out/$v"
  cp "$runs/$v/eval-test.json" "$runs/$v/log.jsonl" "$runs/$v/plots.png" "$runs/$v/console.txt" "$out/$v/" \
    2>/dev/null
done
cp "$runs/results.md" "$runs/results.json" "$runs/differences.json" "$out/" 2>/dev/null || { tail -5 "$out/ablation.txt"; exit 1; }
mv "$out/results.md" "$out/RESULTS.md"
cat "$out/RESULTS.md"
ls -l "$out"
