#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests/test_slurm.py: munge + slurmctld + slurmd, the node
# being this host with its CPUs (and no GPUs). Idempotent: a cluster that answers is left running.
#
#   bash tests/slurm_cluster.sh              # install Debian's packages when missing (root, apt), then start
#   bash tests/slurm_cluster.sh --no-install # start only if the packages are there (what the tests call)
#
# Exit 0 when `sinfo` shows the node up; otherwise exit 1 with one line saying why (no root, no packages,
# a daemon that will not start). CI calls it before pytest and carries on either way: then the SLURM tests
# skip, giving the reason. It writes /etc/slurm/slurm.conf (only if absent or written by this script) and
# $SLURM_TEST_DIR (default /var/lib/slurm-test): state, spool and logs.
set -uo pipefail

INSTALL=1
[ "${1:-}" = "--no-install" ] && INSTALL=0
STATE=${SLURM_TEST_DIR:-/var/lib/slurm-test}
CONF=/etc/slurm/slurm.conf
MARK="# written by tests/slurm_cluster.sh"

say() { echo "slurm_cluster: $*"; }
fail() { say "$*"; exit 1; }
cluster_up() { timeout 5 sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }
munge_ok() { echo | munge 2>/dev/null | unmunge >/dev/null 2>&1; }

if [ "$(id -u)" != 0 ]; then
    command -v sinfo >/dev/null && cluster_up && { say "running (not root: used as it is)"; exit 0; }
    fail "needs root to start slurmctld/slurmd (SlurmUser=root)"
fi

# ---- packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    [ "$INSTALL" = 1 ] || fail "slurmctld, slurmd, slurm-client or munge is not installed (bash tests/slurm_cluster.sh installs them)"
    command -v apt-get >/dev/null || fail "no apt-get to install slurmctld slurmd slurm-client munge"
    say "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q slurmctld slurmd slurm-client munge; } >/tmp/slurm_cluster_apt.log 2>&1 \
        || fail "apt-get install failed (see /tmp/slurm_cluster_apt.log)"
fi

# ---- munge: a key, and the daemon (as root with --force: fine on a throwaway test machine)
if ! munge_ok; then
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
        chmod 400 /etc/munge/munge.key
    fi
    chown -R root:root /etc/munge /var/lib/munge /var/log/munge /run/munge
    munged --force || fail "munged did not start"
    for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || fail "munge does not answer"
fi

# ---- slurm.conf: this host (reached at 127.0.0.1, whatever its name resolves to) and its CPUs, root as SlurmUser, no cgroups, requeue allowed, a scheduler
# that looks every second (the default minute would dominate a test's run time), and job credentials that expire
# after 10 s: a requeued job waits that long before it starts again (120 s by default), and starting it sooner
# is refused ("Job credential revoked")
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$STATE/log"
if [ -f "$CONF" ] && ! grep -q "$MARK" "$CONF"; then
    fail "$CONF exists and was not written by this script; not touching it"
fi
WANTED="$MARK
ClusterName=testcluster
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
SlurmdParameters=config_overrides
KillWait=10
MinJobAge=600
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
if [ "$(cat "$CONF" 2>/dev/null)" != "$WANTED" ]; then
    echo "$WANTED" > "$CONF"
    if pgrep -x slurmctld >/dev/null; then scontrol reconfigure || fail "scontrol reconfigure failed"; fi
fi
if cluster_up; then
    say "running: $(sinfo -h -o '%N %c CPUs %t')"
    exit 0
fi

# ---- the daemons (each daemonizes itself); -c: a clean start, no jobs from an earlier cluster
pgrep -x slurmctld >/dev/null || slurmctld -c || fail "slurmctld did not start (see $STATE/log/slurmctld.log)"
pgrep -x slurmd >/dev/null || slurmd -c || fail "slurmd did not start (see $STATE/log/slurmd.log)"
for _ in $(seq 100); do
    cluster_up && { say "up: $(sinfo -h -o '%N %c CPUs %t')"; exit 0; }
    # a node left down or drained by an earlier run comes back
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1
    sleep 0.2
done
fail "the node did not come up: $(sinfo -h -o '%N %t %E' 2>&1 | head -1) (see $STATE/log)"
