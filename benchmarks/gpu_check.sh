#!/usr/bin/env bash
# Issue 6's GPU figures and the golden check on a GPU, in one call of a lent GPU machine (~6 minutes on an
# H200). Its image has PyTorch and most of our dependencies but not pycocotools; ../shared does not travel.
# Prepare once, in the repository root (.gpu/ is git-ignored):
#   mkdir -p .gpu && cp ../shared/reference/official/golden_tiny_w7_224.safetensors .gpu/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu pycocotools
# then run `bash benchmarks/gpu_check.sh` there carrying .gpu (timeout ~540 s). Reports land in $OUT when
# set (the device tool's folder), else benchmarks/results: the GPU and torch, the golden check in true fp32
# on the GPU, `lgformer bench` JSON of Swin-B at 480 (inference fp32 / bf16 / fp16 at batch 1, and a
# training step at batch 16 in bf16 and in fp16, the authors' AMP).
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
source benchmarks/gpu_env.sh "$out"
lg() { python3 -m lgformer.cli "$@"; }
swin=(--preset official-swin-b --size 480 --device cuda --json)

if [ -f .gpu/golden_tiny_w7_224.safetensors ]; then
  lg verify-official .gpu/golden_tiny_w7_224.safetensors --variant tiny-w7 --device cuda | tee "$out/verify_cuda.txt"
fi
for dtype in fp32 bf16 fp16; do
  lg bench "${swin[@]}" --dtype "$dtype" --repeat 20 >"$out/bench_h200_swin-b_480_$dtype.json"
done
for dtype in bf16 fp16; do
  lg bench "${swin[@]}" --dtype "$dtype" --batch 16 --train --repeat 5 >"$out/bench_h200_swin-b_480_${dtype}_batch16_train.json"
done
ls -l "$out"
