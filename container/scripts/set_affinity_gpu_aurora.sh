#!/bin/sh
# Pin one MPI rank to one GPU tile, then run the command: set_affinity_gpu_aurora.sh CMD [ARGS...]
# The tile comes from the rank's local id under PALS (PALS_LOCAL_RANKID):
#   COMPOSITE hierarchy (Aurora's default): rank r -> GPU (r / tiles) % gpus, tile r % tiles ("g.t")
#   FLAT hierarchy (set by the frameworks module): rank r -> device r % (gpus * tiles)
# Ranks beyond one per tile wrap around. Override the node shape with AURORA_GPUS / AURORA_TILES.
if [ $# -eq 0 ]; then
    echo "usage: set_affinity_gpu_aurora.sh COMMAND [ARGS...]" >&2
    exit 2
fi
gpus=${AURORA_GPUS:-6}
tiles=${AURORA_TILES:-2}
rank=${PALS_LOCAL_RANKID:-${PMI_LOCAL_RANK:-0}}
if [ "${ZE_FLAT_DEVICE_HIERARCHY:-COMPOSITE}" = "FLAT" ]; then
    mask=$(( rank % (gpus * tiles) ))
else
    mask=$(( (rank / tiles) % gpus )).$(( rank % tiles ))
fi
# Implicit scaling would spread one rank over both tiles; device order must match PCI ids.
unset EnableWalkerPartition
export ZE_ENABLE_PCI_ID_DEVICE_ORDER=1
export ZE_AFFINITY_MASK="$mask"
# No core dumps, as ALCF's own script sets, until Aurora's file-system problems are fixed.
ulimit -c 0
exec "$@"
