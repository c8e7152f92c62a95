# Shared by the sbatch scripts: rendezvous from the SLURM allocation, the launchers, and a dry-run mode.
# DRY_RUN=1 prints the commands instead of running them (works outside SLURM too); DRY_RUN_STATUS=75
# pretends the job step exited with that status (75: preempted).
#
# Settable from the environment (sbatch passes it on): LAUNCHER, GPUS_PER_NODE, CPUS_PER_TASK, MASTER_ADDR,
# MASTER_PORT, HOSTFILE, PREEMPTED_FILE, and GLOO_SOCKET_IFNAME (with NCCL_SOCKET_IFNAME): on nodes with several
# network interfaces, the one the ranks reach each other by (e.g. GLOO_SOCKET_IFNAME=ib0); gloo otherwise takes
# the interface of the host name, which may be a management network the other nodes cannot reach.

hostnames() {  # the allocation's nodes, one per line
  # scontrol expands ranges (gpu[01-04]); where it cannot (installed, but no cluster configured) it fails or
  # prints nothing, and a comma-separated list is split as it is.
  local expanded=""
  if command -v scontrol >/dev/null 2>&1; then expanded=$(scontrol show hostnames "$1" 2>/dev/null); fi
  if [ -n "$expanded" ]; then echo "$expanded"; else echo "$1" | tr ',' '\n'; fi
}

NODELIST=${SLURM_JOB_NODELIST:-$(hostname)}
export MASTER_ADDR=${MASTER_ADDR:-$(hostnames "$NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
LAUNCHER=${LAUNCHER:-srun}  # srun: one task per GPU | deepspeed: one deepspeed launcher per node
# Each rank gets its share of the node's CPUs: its decoding workers, forkserver and communication threads
# otherwise share one core (srun gives a task one CPU unless told).
CPUS_ON_NODE=${SLURM_CPUS_ON_NODE:-$GPUS_PER_NODE}
CPUS_PER_TASK=${CPUS_PER_TASK:-$((CPUS_ON_NODE / GPUS_PER_NODE > 0 ? CPUS_ON_NODE / GPUS_PER_NODE : 1))}
# The ranks of a preempted run create this file (launch/common.py) and the script requeues on it: srun's status
# alone cannot say, since under --kill-on-bad-exit the first rank to exit 75 has srun kill the others.
export PREEMPTED_FILE=${PREEMPTED_FILE:-$PWD/.preempted.${SLURM_JOB_ID:-0}}

run() {  # run (or, with DRY_RUN=1, print) a command; a dry run "exits" with DRY_RUN_STATUS
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; return "${DRY_RUN_STATUS:-0}"; else "$@"; fi
}

launch() {  # launch <entry point> <args...> on every GPU of every node
  local entry=$1; shift
  rm -f "$PREEMPTED_FILE"  # left by an earlier run of this job: only this run's ranks may say it was preempted
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "# rendezvous: MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"; fi
  if [ "$LAUNCHER" = deepspeed ]; then
    local hostfile=${HOSTFILE:-hostfile.$SLURM_JOB_ID}
    if [ "${DRY_RUN:-0}" = 1 ]; then
      hostnames "$NODELIST" | sed "s/\$/ slots=$GPUS_PER_NODE/" | sed 's/^/# hostfile: /'
    else
      hostnames "$NODELIST" | sed "s/\$/ slots=$GPUS_PER_NODE/" > "$hostfile"
    fi
    # One deepspeed launcher per node, started by srun (no ssh: SLURM tracks and signals every process). The
    # launchers ignore USR1 (an ignored signal stays ignored across exec; the ranks install their own handler):
    # the preemption warning goes to every process of the step, and a launcher it ended would take its ranks.
    run srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task="$CPUS_ON_NODE" \
      bash -c 'trap "" USR1; exec deepspeed --no_ssh --node_rank="$SLURM_NODEID" "$@"' deepspeed \
      --hostfile "$hostfile" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$entry" "$@"
  else
    # srun starts one task per GPU; the entry points read SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS.
    run srun --kill-on-bad-exit=1 --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" \
      python "$entry" "$@"
  fi
}

preempted() {  # preempted <status of launch>: the run saved and stopped for a preemption
  [ "$1" = 75 ] || [ -e "$PREEMPTED_FILE" ]
}
