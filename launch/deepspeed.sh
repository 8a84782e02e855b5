#!/usr/bin/env bash
# Train with the DeepSpeed launcher on this node: NPROC processes running `python -m vlscale.train`.
#
#   NPROC=8 launch/deepspeed.sh --recipe zerovl-v100 train.run_dir=runs/zvl
#   NPROC=2 launch/deepspeed.sh --recipe tiny-cpu train.steps=50          # CPU: gloo, 2 processes
#
# Environment: NPROC (default: number of GPUs, or 2 without one), MASTER_PORT (29500),
# PYTHON (the interpreter whose site-packages hold vlscale and deepspeed; default: python3).
# On a machine without an NVIDIA driver DS_ACCELERATOR=cpu is set, and OMP_NUM_THREADS is
# split between the processes so that they do not oversubscribe the cores.
set -euo pipefail
PYTHON=${PYTHON:-python3}
MASTER_PORT=${MASTER_PORT:-29500}
if command -v nvidia-smi >/dev/null 2>&1; then
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
else
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  NPROC=${NPROC:-2}
  CORES=$(nproc)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}
fi
# The runner spawns `sys.executable -m deepspeed.launcher.launch`, so the same interpreter runs
# every rank; --module makes each rank run `python -m vlscale.train`.
exec "$PYTHON" -c 'import sys; from deepspeed.launcher.runner import main; sys.exit(main())' \
  --num_gpus "$NPROC" --master_port "$MASTER_PORT" --module vlscale.train "$@"
