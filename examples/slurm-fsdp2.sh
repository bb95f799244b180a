#!/bin/bash
# dstune on several machines under SLURM: one launcher per machine, each starting one process per GPU.
#   sbatch examples/slurm-fsdp2.sh examples/fsdp2-lora-deepseek-v3-tiny.yaml
# Replace the tiny model with yours (model.name, or --model); train.distributed: fsdp2 shards it over all
# GPUs of all machines. Checkpoints go to the config's output directory, which every machine must see
# (a shared file system); only the first process of the first machine writes it.
#SBATCH --job-name=dstune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --signal=TERM@300
# --signal: SLURM sends SIGTERM 300 s before the time limit; every rank finishes its step, saves a
# checkpoint and exits 130; sbatch the same script with --resume added to continue.
set -euo pipefail
CONFIG=${1:?usage: sbatch examples/slurm-fsdp2.sh CONFIG [dstune train flags]}
shift
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
# One task per machine; $SLURM_NODEID is that machine's number (0 .. nodes-1), read inside each task.
srun bash -c 'exec dstune train "$0" --nproc "$SLURM_GPUS_ON_NODE" --nnodes "$SLURM_NNODES" \
  --node-rank "$SLURM_NODEID" --master-addr "$MASTER_ADDR" --master-port 29500 "$@"' "$CONFIG" "$@"
