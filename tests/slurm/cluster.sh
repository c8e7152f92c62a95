#!/usr/bin/env bash
# A two-node SLURM cluster on this machine, for the tests: munged, slurmctld and two slurmd (n1, n2, each with
# two fake GPUs declared as gres), all configured and logging under one directory.
#
#   tests/slurm/cluster.sh start DIR   # writes DIR/slurm.conf, starts the daemons, waits until both nodes are idle
#   tests/slurm/cluster.sh stop DIR    # ends the daemons it started
#   SLURM_CONF=DIR/slurm.conf sbatch ...   # clients find the cluster by SLURM_CONF
#
# Needs root (daemons as root, device nodes, /etc/hosts) and Debian's slurm-wlm and munge packages.
set -euo pipefail
command=${1:?usage: cluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: cluster.sh start|stop DIR}")

stop() {
  # Jobs still running are cancelled first (their slurmstepd would outlive slurmd); then the slurm daemons, all
  # at once (each takes about 2 s to end); munged last (every daemon needs it).
  if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    SLURM_CONF=$dir/slurm.conf timeout 10 scancel --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 50); do
      [ -z "$(SLURM_CONF=$dir/slurm.conf timeout 5 squeue -h -t running,completing 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  end_daemons "$dir"/slurmd.*.pid "$dir"/slurmctld.pid
  end_daemons "$dir"/munged.pid
}

end_daemons() {  # end_daemons <pid files>: TERM, up to 10 s to exit, then KILL
  local pids=() pidfile pid
  for pidfile in "$@"; do
    if [ -f "$pidfile" ]; then pids+=("$(cat "$pidfile")"); rm -f "$pidfile"; fi
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 100); do
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && break; pid=; done
    [ -z "$pid" ] && return 0
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

if [ "$command" = stop ]; then stop; exit 0; fi
[ "$command" = start ] || { echo "usage: cluster.sh start|stop DIR" >&2; exit 2; }

for tool in munged slurmctld slurmd sbatch; do
  command -v "$tool" >/dev/null || { echo "cluster.sh: $tool is missing: apt-get install slurm-wlm munge" >&2; exit 3; }
done
port=${PORT_BASE:-16817}  # slurmctld; n1 and n2 listen on the next two ports
stop  # a previous cluster left in this directory
rm -rf "$dir/state"  # a fresh cluster: no jobs of an earlier one
mkdir -p "$dir"/{state,spool,dev,munge}
chmod 700 "$dir" "$dir/munge"  # munged refuses a key or socket in a directory others can write

# The node names resolve to this machine: the sbatch scripts use the first node's name as MASTER_ADDR.
for node in n1 n2; do
  grep -qE "^[^#]*\s$node(\s|$)" /etc/hosts || echo "127.0.0.1 $node" >> /etc/hosts
done

# munge: its own key and socket, so a munged the machine may already run is left alone.
head -c 1024 /dev/urandom > "$dir/munge/munge.key"
chmod 400 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/socket" --pid-file="$dir/munged.pid" \
  --log-file="$dir/munged.log" --seed-file="$dir/munge/seed"

# Fake GPUs: slurm only needs a device file per GPU (character devices like /dev/null's).
for node in n1 n2; do
  for gpu in 0 1; do
    [ -e "$dir/dev/$node-gpu$gpu" ] || mknod "$dir/dev/$node-gpu$gpu" c 1 3
  done
done

cat > "$dir/slurm.conf" <<CONF
ClusterName=difftune-test
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$port
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again.
AuthInfo=socket=$dir/munge/socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.%n.log
# One machine plays both nodes: processes tracked by parent pid, no cgroups or CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# The nodes have the CPUs written here, whatever the machine has (task/none binds no process to a CPU).
SlurmdParameters=config_overrides
GresTypes=gpu
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
# A job that became eligible (a requeue's delay ended) starts at the next pass of the scheduler.
SchedulerParameters=sched_interval=1
# No accounting: jobs are followed with squeue / scontrol, and kept there for MinJobAge seconds once ended.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
KillWait=5
InactiveLimit=0
NodeName=n1 NodeAddr=127.0.0.1 Port=$((port + 1)) CPUs=4 Gres=gpu:2 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=$((port + 2)) CPUs=4 Gres=gpu:2 State=UNKNOWN
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
cat > "$dir/gres.conf" <<CONF
AutoDetect=off
NodeName=n1 Name=gpu File=$dir/dev/n1-gpu[0-1]
NodeName=n2 Name=gpu File=$dir/dev/n2-gpu[0-1]
CONF

export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF"
for node in n1 n2; do slurmd -f "$SLURM_CONF" -N "$node"; done

for _ in $(seq 100); do  # both nodes idle: ready for jobs
  if [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle')" = 2 ]; then exit 0; fi
  sleep 0.2
done
echo "cluster.sh: the nodes did not come up; logs in $dir:" >&2
tail -n 20 "$dir"/*.log >&2
exit 1
