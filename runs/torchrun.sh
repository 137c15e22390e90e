# Sourced by the GPU run scripts: sets TORCHRUN, the launcher of every distributed stage, for NPROC GPUs here.
#   one node (NNODES unset or 1):  torchrun --standalone
#   several nodes: the same script on every node, with NNODES, NODE_RANK (this node, 0..NNODES-1) and
#   MASTER_ADDR (node 0's address; MASTER_PORT defaults to 29500): torchrun's rendezvous at node 0.
NPROC="${NPROC:-8}"
NNODES="${NNODES:-1}"
if [ "$NNODES" = 1 ]; then
    TORCHRUN="torchrun --standalone --nproc_per_node=$NPROC"
else
    if ! [[ "$NNODES" =~ ^[1-9][0-9]*$ && "${NODE_RANK:-}" =~ ^[0-9]+$ && -n "${MASTER_ADDR:-}" ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
        echo "$0: NNODES=$NNODES needs NODE_RANK (this node: 0 .. NNODES-1; got '${NODE_RANK:-}') and MASTER_ADDR" \
             "(the address of node 0; got '${MASTER_ADDR:-}'), e.g. NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash $0" >&2
        exit 1
    fi
    # The base dir must be one directory shared by every node (base_train checks it at start). Node 0 alone
    # downloads the shards and trains the tokenizer there (main_node below) before its first launch, so the
    # rendezvous waits up to 30 minutes (torchrun's default is 10) for it to arrive.
    TORCHRUN="torchrun --nnodes=$NNODES --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR \
--master_port=${MASTER_PORT:-29500} --rdzv_conf=timeout=1800 --nproc_per_node=$NPROC"
fi

# The steps that run once per run, not once per node (downloads, the tokenizer, the report): node 0's.
main_node() { [ "${NODE_RANK:-0}" = 0 ]; }
