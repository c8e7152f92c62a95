# Shared by the sbatch scripts: rendezvous from the SLURM allocation, and a dry-run mode.
# DRY_RUN=1 prints the commands instead of running them (works outside SLURM too); DRY_RUN_STATUS=75
# pretends the job step exited with that status (75: preempted).

hostnames() {  # the allocation's nodes, one per line
  if command -v scontrol >/dev/null 2>&1; then scontrol show hostnames "$1"; else echo "$1" | tr ',' '\n'; fi
}

NODELIST=${SLURM_JOB_NODELIST:-$(hostname)}
export MASTER_ADDR=${MASTER_ADDR:-$(hostnames "$NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
LAUNCHER=${LAUNCHER:-srun}  # srun: one task per GPU | deepspeed: the deepspeed launcher over a hostfile

run() {  # run (or, with DRY_RUN=1, print) a command; a dry run "exits" with DRY_RUN_STATUS
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; return "${DRY_RUN_STATUS:-0}"; else "$@"; fi
}

launch() {  # launch <entry point> <args...> on every GPU of every node
  local entry=$1; shift
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "# rendezvous: MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"; fi
  if [ "$LAUNCHER" = deepspeed ]; then
    local hostfile=${HOSTFILE:-hostfile.$SLURM_JOB_ID}
    if [ "${DRY_RUN:-0}" = 1 ]; then
      hostnames "$NODELIST" | sed "s/\$/ slots=$GPUS_PER_NODE/" | sed 's/^/# hostfile: /'
    else
      hostnames "$NODELIST" | sed "s/\$/ slots=$GPUS_PER_NODE/" > "$hostfile"
    fi
    run deepspeed --hostfile "$hostfile" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$entry" "$@"
  else
    # srun starts one task per GPU; the entry points read SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS.
    run srun --kill-on-bad-exit=1 --ntasks-per-node="$GPUS_PER_NODE" python "$entry" "$@"
  fi
}
