#!/usr/bin/env bash
# Train with torchrun: NPROC processes per node running `python -m vlscale.train`
# (any engine: local, deepspeed, fsdp — the FSDP2 recipe is launched this way).
#
#   NPROC=8 launch/torchrun.sh --recipe fsdp2 train.run_dir=runs/fsdp2
#   NPROC=2 launch/torchrun.sh --recipe tiny-cpu engine.kind=local engine.zero_stage=0
#
# Several nodes: run the same command on every node with NNODES, NODE_RANK (0 … NNODES-1) and
# MASTER_ADDR (node 0's address, reachable from all nodes), e.g. on two nodes:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC=8 launch/torchrun.sh --recipe fsdp2   # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPROC=8 launch/torchrun.sh --recipe fsdp2   # on node 1
#
# (Two "nodes" on one machine, to try it: MASTER_ADDR=127.0.0.1 and NODE_RANK=0 / 1 in two shells.)
# The run directory must be on a file system every node shares (checkpoints are written by all ranks).
#
# Environment: NPROC (default: number of GPUs, or 2 without one), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500; one node without it: a free port), PYTHON (default: the project's .venv/bin/python,
# else python3), DRY_RUN=1 prints the command instead of running it. Without an NVIDIA driver
# DS_ACCELERATOR=cpu is set and OMP_NUM_THREADS is split between the processes.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PORT_GIVEN=${MASTER_PORT:-}
MASTER_PORT=${MASTER_PORT:-29500}
if command -v nvidia-smi >/dev/null 2>&1; then
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
else
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  NPROC=${NPROC:-2}
  CORES=$(nproc)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}
fi
if [[ "$NNODES" -gt 1 ]]; then
  NODES=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
elif [[ -n "$PORT_GIVEN" ]]; then
  NODES=(--nnodes 1 --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
else
  NODES=(--standalone --nnodes 1)  # one node: torchrun picks a free port itself
fi
CMD=("$PYTHON" -m torch.distributed.run "${NODES[@]}" --nproc_per_node "$NPROC" -m vlscale.train "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${CMD[*]}"; exit 0; fi
exec "${CMD[@]}"
