#!/usr/bin/env bash
# Train with torchrun on this node: NPROC processes running `python -m vlscale.train`
# (any engine: local, deepspeed, fsdp — the FSDP2 recipe is launched this way).
#
#   NPROC=8 launch/torchrun.sh --recipe fsdp2 train.run_dir=runs/fsdp2
#   NPROC=2 launch/torchrun.sh --recipe tiny-cpu engine.kind=local engine.zero_stage=0
#
# Environment: NPROC (default: number of GPUs, or 2 without one),
# PYTHON (default: python3). Without an NVIDIA driver DS_ACCELERATOR=cpu is set and
# OMP_NUM_THREADS is split between the processes.
set -euo pipefail
PYTHON=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null 2>&1; then
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
else
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  NPROC=${NPROC:-2}
  CORES=$(nproc)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$NPROC" \
  -m vlscale.train "$@"
