#!/bin/bash
# GDT 8B full fine-tune on Slurm: N nodes x 8 GPUs, requeued on preemption.
# Slurm sends SIGTERM before it kills a job: the recipe then finishes the current step, writes
# ${output_dir}/step_N and exits 0 (within one batch during a validation); the requeued job resumes
# from the newest complete checkpoint. A requeue of a finished run (its last epoch_N complete) says
# so and exits 0 without loading anything. --signal gives the final save of 16 GB time to finish.
#SBATCH --job-name=gdt-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

# needs gdt_tune installed in the job's Python (pip install .): gdt-tune train runs from any folder
OUT=${OUT:-/shared/runs/gdt}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RESUME=false
if compgen -G "$OUT/step_*/COMPLETE" >/dev/null || compgen -G "$OUT/epoch_*/COMPLETE" >/dev/null; then
  RESUME=true
fi

srun --kill-on-bad-exit=1 gdt-tune train \
  --nnodes "$SLURM_NNODES" --nproc_per_node 8 \
  --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:29500" --rdzv_id "$SLURM_JOB_ID" \
  --config llama3_1_8b_gdt_full \
  model_dir=/models/Llama-3.1-8B-Instruct data_dir=/data/gdt output_dir="$OUT" \
  resume_from_checkpoint="$RESUME"
