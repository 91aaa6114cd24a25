#!/usr/bin/env bash
# Step time, peak memory and FLOPs of DTI on SDXL, SANA, Wan 2.1 and FLUX.2 [klein] at the authors' settings, on one NVIDIA GPU, with random
# weights of the real architectures (nothing is downloaded), then whole runs of SDXL and SANA 1.6B from launch to exit.
# About 13 minutes on one H100 for the steps (estimated: the Wan, klein, SANA text and SANA K lines have not run on a
# GPU) and about 20 more for the whole runs (estimated from the measured step times: 3 SDXL runs of 400 steps, 2 SANA
# runs of 500, their validations, loads and the writing of the random pipelines); RUNS=0 skips the whole runs.
#
#   bash benchmarks/gpu_check.sh [output folder]          (default: benchmarks/results)
#
# Writes one JSON per setting and prints the tables (ratios to the floor: the denoiser's forward + input-gradient
# backward; the runs' phases). SANA 4.8B (depth derived from its parameter count): add WITH_SANA_4_8B=1.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
bench=(benchmarks/bench_step.py --steps "${STEPS:-8}" --warmup "${WARMUP:-2}")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

"$python" "${bench[@]}" --family sdxl --resolution 768 --batch_size 4 --validation_images 4 --output "$out/sdxl-768.json"
# Many concepts per step (--concepts_list): K = 1, 2, 4, 8 concepts of batch 4; K = 8 at once needs about 95 GiB
# (estimated), so on an 80 GB card the concepts go through in groups of CONCEPTS_PER_STEP (default 4).
"$python" "${bench[@]}" --family sdxl --resolution 768 --batch_size 4 --variants dti+cache \
  --num_concepts 1 2 4 8 --concepts_per_step "${CONCEPTS_PER_STEP:-4}" --output "$out/sdxl-768-concepts.json"
"$python" "${bench[@]}" --family sdxl --resolution 1024 --batch_size 4 \
  --variants floor dti+cache dti+gc+cache dti+gc+cache+8bit --output "$out/sdxl-1024.json"
"$python" "${bench[@]}" --family sana --config sana-1.5-1.6b --resolution 1024 --batch_size 2 \
  --gradient_accumulation_steps 2 --output "$out/sana-1.6b-1024.json"
# SANA's Gemma-2 over the batch's longest prompt (the script) against all 300 positions; one validation of 4 images in
# one pipeline call against 4 calls.
"$python" "${bench[@]}" --family sana --config sana-1.5-1.6b --resolution 1024 --batch_size 2 \
  --gradient_accumulation_steps 2 --variants dti+cache dti+cache+full_text --validation_images 4 \
  --output "$out/sana-1.6b-1024-text.json"
# K = 1, 2, 4, 8 SANA concepts of batch 2 x accumulation 2 per step, in groups of CONCEPTS_PER_STEP.
"$python" "${bench[@]}" --family sana --config sana-1.5-1.6b --resolution 1024 --batch_size 2 \
  --gradient_accumulation_steps 2 --variants dti+cache --num_concepts 1 2 4 8 \
  --concepts_per_step "${CONCEPTS_PER_STEP:-4}" --output "$out/sana-1.6b-1024-concepts.json"
# Wan 2.1 1.3B at the DTI authors' settings: 512 px images as 1-frame videos, batch 2 x accumulation 2.
"$python" "${bench[@]}" --family wan --config wan2.1-t2v-1.3b --resolution 512 --batch_size 2 \
  --gradient_accumulation_steps 2 --variants floor dti dti+cache ti+cache dti+cache+compile dti+gc+cache \
  --output "$out/wan-1.3b-512.json"
# FLUX.2 [klein] base 4B at 1024 px, batch 2 x accumulation 2 (our defaults; the Qwen3 encoder cut after layer 28).
"$python" "${bench[@]}" --family flux2-klein --config flux2-klein-base-4b --resolution 1024 --batch_size 2 \
  --gradient_accumulation_steps 2 --variants floor dti dti+cache dti+gc+cache --output "$out/klein-4b-1024.json"
if [ "${WITH_SANA_4_8B:-0}" = 1 ]; then
  "$python" "${bench[@]}" --family sana --config sana-1.5-4.8b --resolution 1024 --batch_size 2 \
    --gradient_accumulation_steps 2 --variants floor dti+cache dti+gc+cache --output "$out/sana-4.8b-1024.json"
fi
if [ "${RUNS:-1}" = 1 ]; then
  # Whole runs, launch to exit, with each family's defaults (SDXL 768 px, batch 4, 400 steps; SANA 1024 px, 2 x 2,
  # 500 steps; 4 validation images every 50 steps), bf16, from random weights saved as fp16 variant files.
  "$python" benchmarks/bench_run.py --family sdxl --config full --settings default cache cache+compile \
    --output "$out/sdxl-run.json"
  "$python" benchmarks/bench_run.py --family sana --config full --settings default cache --output "$out/sana-1.6b-run.json"
fi
echo "JSON files in $out"
