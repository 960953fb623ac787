#!/usr/bin/env bash
# DDP without SLURM: torchrun starts one process per device on each machine; Lightning detects torchrun (its
# TorchElasticEnvironment) and takes ranks and world size from it, so scripts/train.py runs unchanged.
#
# One machine, all its GPUs:
#   scripts/torchrun.sh fit -c configs/mnist/cnn.yaml [--key value ...]
# Two machines with 8 GPUs each: the same command on both, NODE_RANK=0 on the machine at MASTER_ADDR:
#   NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 scripts/torchrun.sh fit -c ...
#   NNODES=2 NODE_RANK=1 NPROC_PER_NODE=8 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 scripts/torchrun.sh fit -c ...
# CPU processes (gloo), e.g. to try it on a laptop:
#   ACCELERATOR=cpu NPROC_PER_NODE=2 scripts/torchrun.sh fit -c configs/quickstart.yaml
#
# Lightning requires --trainer.devices x --trainer.num_nodes = the world size torchrun starts: this script passes
# NPROC_PER_NODE and NNODES (after your arguments, so they win). Compute nodes without network: see
# scripts/download_data.py, DATA_DIR and WANDB_MODE=offline in docs/data.md and docs/clusters.md.
set -euo pipefail

NNODES=${NNODES:-1}                       # machines taking part
NODE_RANK=${NODE_RANK:-0}                 # this machine: 0 .. NNODES-1 (0 hosts the rendezvous)
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}     # rendezvous: address of the NODE_RANK=0 machine, reachable from all
MASTER_PORT=${MASTER_PORT:-29500}         # rendezvous: a free TCP port on it
ACCELERATOR=${ACCELERATOR:-gpu}
STRATEGY=${STRATEGY:-ddp}                 # fsdp: shard a model too large for one GPU (GPUs only)
PYTHON=${PYTHON:-python}
if [ -z "${NPROC_PER_NODE:-}" ]; then     # default: every GPU of this machine
    NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
fi
if [ "$#" -eq 0 ]; then
    echo "usage: [NNODES=.. NODE_RANK=.. MASTER_ADDR=.. MASTER_PORT=..] [NPROC_PER_NODE=N] $0 fit -c CONFIG [...]" >&2
    exit 2
fi
if [ "$NPROC_PER_NODE" -lt 1 ]; then
    echo "$0: no GPU found; set NPROC_PER_NODE (and ACCELERATOR=cpu for CPU processes)." >&2
    exit 2
fi

if [ "$NNODES" -eq 1 ]; then
    RENDEZVOUS=(--standalone)             # one machine: a private rendezvous on a free local port
else
    RENDEZVOUS=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
fi

exec "$PYTHON" -m torch.distributed.run "${RENDEZVOUS[@]}" --nproc-per-node "$NPROC_PER_NODE" \
    "$(dirname "$0")/train.py" "$@" \
    --trainer.accelerator "$ACCELERATOR" \
    --trainer.strategy "$STRATEGY" \
    --trainer.devices "$NPROC_PER_NODE" \
    --trainer.num_nodes "$NNODES"
