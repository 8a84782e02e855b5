#!/usr/bin/env bash
# Train with the DeepSpeed launcher on this node: NPROC processes running `python -m vlscale.train`.
#
#   NPROC=8 launch/deepspeed.sh --recipe zerovl-v100 train.run_dir=runs/zvl
#   NPROC=8 launch/deepspeed.sh --recipe zerovl-v100 --deepspeed_config my_ds.json   # your ds_config wins
#   NPROC=2 launch/deepspeed.sh --recipe tiny-cpu train.steps=50          # CPU: gloo, 2 processes
#
# Several nodes: DeepSpeed's own launcher takes a hostfile (`deepspeed --hostfile hosts
# --module vlscale.train ...`, passwordless ssh to every node; without ssh run `deepspeed --hostfile
# hosts --no_ssh --node_rank R --master_addr NODE0 --module vlscale.train ...` on each node), or use
# launch/torchrun.sh with NNODES / NODE_RANK / MASTER_ADDR on each node; see the README.
#
# Environment: NPROC (default: number of GPUs, or 2 without one), MASTER_PORT (29500),
# PYTHON (the interpreter whose site-packages hold vlscale and deepspeed; default: the project's
# .venv/bin/python, else python3), DRY_RUN=1 prints the command instead of running it.
# On a machine without an NVIDIA driver DS_ACCELERATOR=cpu is set, and OMP_NUM_THREADS is
# split between the processes so that they do not oversubscribe the cores.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
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
CMD=("$PYTHON" -c 'import sys; from deepspeed.launcher.runner import main; sys.exit(main())'
     --num_gpus "$NPROC" --master_port "$MASTER_PORT" --module vlscale.train "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${CMD[*]}"; exit 0; fi
exec "${CMD[@]}"
