#!/usr/bin/env bash
# A one-node SLURM cluster with accounting, for the tests and for trying ablate's SLURM path:
#
#   bash tests/slurm/cluster.sh start    # install (when missing), configure, start; wait for an idle node
#   bash tests/slurm/cluster.sh status   # exit 0 when the node answers and is idle or allocated
#   bash tests/slurm/cluster.sh stop     # stop exactly the daemons `start` started
#
# Debian's slurm-wlm 22.05, slurmdbd, munge and MariaDB, started as plain background daemons (no
# systemd: the packages' own start scripts are refused in containers). Needs root. Everything lives
# in $ABLATE_SLURM_STATE (default /var/lib/ablate-slurm): the configuration, spool, logs, a private
# MariaDB data folder on its own port and the list of daemons this script started. It writes
# /etc/slurm/slurm.conf and /etc/slurm/slurmdbd.conf (the client tools read them there), refusing to
# replace ones it did not write.
#
# Why these settings: proctrack/linuxproc and task/none need no cgroups; EnforcePartLimits=ALL
# rejects an impossible request at sbatch instead of leaving it pending forever; cred_expire=10 and
# 5-second scheduler intervals let a requeued job start again in about 15 s instead of 120 s; KillWait=5:
# a cancelled job's processes are killed 5 s after SIGTERM (submitit ignores SIGTERM) instead of 30;
# accounting (slurmdbd) is what lets submitit see a job cancelled from outside end.
set -euo pipefail

STATE=${ABLATE_SLURM_STATE:-/var/lib/ablate-slurm}
DB_PORT=${ABLATE_SLURM_DB_PORT:-3316}
PARTITION=debug
MARK="# written by ablate's tests/slurm/cluster.sh"
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)

say() { echo "slurm cluster: $*" >&2; }
die() { say "$*"; exit 1; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v munged >/dev/null || missing+=(munge)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    [ ${#missing[@]} -eq 0 ] && return
    say "installing ${missing[*]}"
    command -v apt-get >/dev/null || die "no apt-get: install ${PACKAGES[*]} yourself"
    apt-get update -qq >/dev/null || die "apt-get update failed: no package access"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
}

write_conf() {  # write_conf <path> <mode> <owner>; the text on stdin
    local path=$1
    if [ -f "$path" ] && ! grep -qF "$MARK" "$path"; then
        die "$path exists and was not written by this script: move it away or use that cluster"
    fi
    { echo "$MARK"; cat; } >"$path"
    chmod "$2" "$path"; chown "$3" "$path"
}

started() { echo "$1 $2" >>"$STATE/started"; }  # name pid: what `stop` stops

wait_for() {  # wait_for <seconds> <what> <command...>
    local limit=$1 what=$2; shift 2
    for _ in $(seq "$limit"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
    die "$what did not come up within ${limit} s (logs in $STATE)"
}

start_munge() {
    if munge -n </dev/null >/dev/null 2>&1; then return; fi  # a munged is already running: use it
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    [ -f /etc/munge/munge.key ] || { mungekey --create >/dev/null 2>&1 || \
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; }
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged --force
    wait_for 10 munged munge -n
    started munged "$(cat /run/munge/munged.pid)"
}

start_mariadb() {  # a private server: its own data folder, port and socket, run as mysql
    local db=$STATE/mariadb run=$STATE/mariadb-run
    install -d -o mysql -g mysql "$run"
    if [ ! -d "$db/mysql" ]; then
        install -d -o mysql -g mysql "$db"
        mariadb-install-db --no-defaults --user=mysql --datadir="$db" --auth-root-authentication-method=socket \
            >"$STATE/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $STATE/mariadb-install.log"
    fi
    runuser -u mysql -- /usr/sbin/mariadbd --no-defaults --datadir="$db" --port="$DB_PORT" \
        --bind-address=127.0.0.1 --socket="$run/mariadb.sock" --pid-file="$run/mariadb.pid" \
        --log-error="$run/mariadb.log" --skip-log-bin >>"$run/mariadb.log" 2>&1 &
    started mariadbd $!
    wait_for 30 MariaDB mariadb --socket="$run/mariadb.sock" -e "select 1"
    mariadb --socket="$run/mariadb.sock" <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'ablate';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'ablate';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
}

configure() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # MB the jobs may ask for
    install -d "$STATE/ctld" "$STATE/d" /etc/slurm
    write_conf /etc/slurm/slurm.conf 0644 root:root <<EOF
ClusterName=ablate
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MailProg=/bin/true
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
EnforcePartLimits=ALL
ReturnToService=2
MinJobAge=60
KillWait=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobAcctGatherType=jobacct_gather/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    write_conf /etc/slurm/slurmdbd.conf 0600 root:root <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=ablate
StorageLoc=slurm_acct_db
EOF
}

start_daemon() {  # start_daemon <name> <pid file> <command...>: daemons that fork into the background
    local name=$1 pidfile=$2; shift 2
    rm -f "$pidfile"
    "$@" || die "$name did not start (log in $STATE/$name.log)"
    wait_for 20 "$name" test -s "$pidfile"
    started "$name" "$(cat "$pidfile")"
}

node_ready() { sinfo -h -p "$PARTITION" -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }

start() {
    [ "$(id -u)" -eq 0 ] || die "needs root (it installs packages and starts daemons)"
    if [ -s "$STATE/started" ] && node_ready; then say "already running"; return; fi
    [ -s "$STATE/started" ] && stop
    install_packages
    install -d "$STATE"
    : >"$STATE/started"
    start_munge
    configure
    start_mariadb
    start_daemon slurmdbd "$STATE/slurmdbd.pid" /usr/sbin/slurmdbd
    wait_for 30 slurmdbd sacctmgr -i list cluster
    sacctmgr -i -Q add cluster ablate >/dev/null 2>&1 || true
    start_daemon slurmctld "$STATE/slurmctld.pid" /usr/sbin/slurmctld
    start_daemon slurmd "$STATE/slurmd.pid" /usr/sbin/slurmd
    wait_for 60 "an idle node" node_ready
    say "up: partition $PARTITION, $(nproc) CPUs, node $(hostname -s) (state in $STATE; stop: $0 stop)"
}

stop() {
    [ -f "$STATE/started" ] || { say "nothing started here"; return; }
    scancel --quiet --partition="$PARTITION" 2>/dev/null || true
    # newest first: slurmd before slurmctld before slurmdbd before MariaDB before munged
    tac "$STATE/started" | while read -r name pid; do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$STATE/started"
    say "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) node_ready ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
