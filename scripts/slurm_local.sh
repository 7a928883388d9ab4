#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for trying patchscan's SLURM launcher and for the tests.
#
#   scripts/slurm_local.sh start     # install slurm-wlm, slurmdbd, munge, mariadb if missing (root, apt-get),
#                                    # write the configs, start the daemons, wait until the node is idle
#   eval "$(scripts/slurm_local.sh env)"   # point sbatch/squeue/sacct/scancel/sinfo at it (SLURM_CONF)
#   scripts/slurm_local.sh status    # the daemons and sinfo
#   scripts/slurm_local.sh stop      # cancel its jobs, stop its daemons, leave nothing running
#
# Everything lives in one state dir, $PATCHSCAN_SLURM_DIR (default /tmp/patchscan-slurm): configs, munge
# key and socket, the accounting database, pid files, logs. Ports: $PATCHSCAN_SLURM_PORT (slurmctld,
# default 6817), +1 slurmd, +2 slurmdbd, +3 mariadb (127.0.0.1 only). Two instances with different dirs
# and ports can run side by side. Nothing under /etc is changed; systemd is not needed.
#
# The daemons: munged (the host's default socket, shared by instances), mariadbd + slurmdbd (accounting: submitit follows its jobs
# with `sacct`, which needs slurmdbd; without it a cancelled or timed-out job looks "UNKNOWN" for ever
# and the launcher waits for ever), slurmctld and slurmd (this host, one node with this machine's CPUs
# and a little less than its memory, partition `debug`). `stop` kills exactly what `start` started:
# the pid files' processes and any process carrying this instance's marker in its environment
# (job steps and job processes included).
set -euo pipefail

DIR=${PATCHSCAN_SLURM_DIR:-/tmp/patchscan-slurm}
PORT=${PATCHSCAN_SLURM_PORT:-6817}
START_TIMEOUT=${PATCHSCAN_SLURM_START_TIMEOUT:-90}
HOST=$(hostname -s)
CONF=$DIR/etc/slurm.conf
MARK=PATCHSCAN_SLURM_INSTANCE=$DIR
MUNGE_MARK=PATCHSCAN_SLURM_MUNGE=1
DAEMONS=(slurmd slurmctld slurmdbd mariadb)   # stop order; munged is shared, see start_munge

log() { printf 'slurm_local: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

alive() {  # a running process (a zombie waiting for this container's init to reap it is not)
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

gone() { ! alive "$1"; }

pid_of() {  # pid of a daemon from its pid file, if that process still runs
    local f=$DIR/run/$1.pid pid
    [[ -s $f ]] || return 1
    pid=$(tr -dc 0-9 <"$f")
    [[ -n $pid ]] && alive "$pid" && echo "$pid"
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v munged >/dev/null || missing+=(munge)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "${missing[*]} not installed and not root: run as root, or apt-get install -y ${missing[*]}"
    command -v apt-get >/dev/null || die "${missing[*]} not installed and no apt-get on this machine"
    log "installing ${missing[*]} (apt-get)"
    local t0=$SECONDS policy=/usr/sbin/policy-rc.d made_policy=0
    export DEBIAN_FRONTEND=noninteractive
    if [[ ! -e $policy ]]; then  # the packages' own services (munge, mariadb, slurm*) must not start
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    local rc=0
    { apt-get update -qq >"$DIR/log/apt.log" 2>&1 \
        && apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$DIR/log/apt.log" 2>&1; } || rc=$?
    if ((made_policy)); then rm -f "$policy"; fi
    ((rc == 0)) || { tail -n 20 "$DIR/log/apt.log" >&2; die "apt-get install ${missing[*]} failed (log: $DIR/log/apt.log)"; }
    log "installed in $((SECONDS - t0)) s"
}

write_configs() {
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
    mem_mb=$((mem_mb - 1024 > 512 ? mem_mb - 1024 : mem_mb * 9 / 10))  # a bit below the machine's
    cat >"$CONF" <<EOF
# written by patchscan scripts/slurm_local.sh: one node ($HOST), partition debug
ClusterName=patchscan
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/d-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# a container: no cgroups, no systemd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$HOST
AccountingStoragePort=$((PORT + 2))
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
KillWait=2
MinJobAge=300
InactiveLimit=0
SlurmdTimeout=60
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$DIR/etc/slurmdbd.conf" <<EOF
# written by patchscan scripts/slurm_local.sh
AuthType=auth/munge
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$((PORT + 2))
SlurmUser=$(id -un)
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT + 3))
StorageUser=slurm
StoragePass=patchscan
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf"
    printf '[client]\nuser=root\nsocket=%s\n' "$DIR/run/mariadb.sock" >"$DIR/etc/my.cnf"
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local limit=$1 what=$2 t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS - t0 < limit)) || return 1
        sleep 0.5
    done
}

start_munge() {
    # Slurm 22.05 reaches slurmdbd through the default munge socket whatever AuthInfo says, so munged is
    # one host service shared by all instances: reuse a running one, else start it (marked, so that
    # `stop` ends it once no instance is left, and never a munged it did not start).
    munge -n >/dev/null 2>&1 && return 0
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chmod 400 /etc/munge/munge.key
    fi
    env "$MUNGE_MARK" munged --force --pid-file=/run/munge/munged.pid --log-file="$DIR/log/munged.log" \
        || die "munged did not start (log: $DIR/log/munged.log)"
    wait_for 10 munge munge -n || die "munged does not answer (log: $DIR/log/munged.log)"
}

start_mariadb() {
    pid_of mariadb >/dev/null && return 0
    local data=$DIR/state/mysql
    if [[ ! -d $data/mysql ]]; then
        mariadb-install-db --no-defaults --user="$(id -un)" --datadir="$data" --auth-root-authentication-method=socket \
            --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 \
            || { tail -n 20 "$DIR/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    fi
    cat >"$DIR/etc/mariadb-init.sql" <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'patchscan';
GRANT ALL ON *.* TO 'slurm'@'127.0.0.1';
EOF
    env "$MARK" setsid mariadbd --no-defaults --user="$(id -un)" --datadir="$data" --socket="$DIR/run/mariadb.sock" \
        --port=$((PORT + 3)) --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$DIR/run/mariadb.pid" \
        --log-error="$DIR/log/mariadb.log" --innodb-buffer-pool-size=64M --innodb-log-file-size=32M \
        --innodb-lock-wait-timeout=900 --init-file="$DIR/etc/mariadb-init.sql" </dev/null >/dev/null 2>&1 &
    wait_for 30 mariadb mariadb-admin --defaults-file="$DIR/etc/my.cnf" ping \
        || { tail -n 20 "$DIR/log/mariadb.log" >&2; die "mariadbd did not start (log: $DIR/log/mariadb.log)"; }
    wait_for 10 mariadb-pid pid_of mariadb || die "mariadbd wrote no pid file"
}

start_slurm_daemon() {  # start_slurm_daemon NAME
    local name=$1
    pid_of "$name" >/dev/null && return 0
    env "$MARK" SLURM_CONF="$CONF" "$name" >>"$DIR/log/$name.out" 2>&1 \
        || { tail -n 20 "$DIR/log/$name.log" "$DIR/log/$name.out" >&2 || true; die "$name did not start"; }
    wait_for 15 "$name" pid_of "$name" \
        || { tail -n 20 "$DIR/log/$name.log" >&2 || true; die "$name exited at start (log: $DIR/log/$name.log)"; }
}

node_idle() {
    [[ $(SLURM_CONF=$CONF sinfo -h -n "$HOST" -o %t 2>/dev/null) == idle ]]
}

cmd_start() {
    local t0=$SECONDS
    mkdir -p "$DIR"/{etc,run,log,state/ctld}
    chmod 755 "$DIR"
    install_packages
    local t1=$SECONDS
    write_configs
    start_munge
    start_mariadb
    start_slurm_daemon slurmdbd
    wait_for 30 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/$((PORT + 2))" \
        || { tail -n 20 "$DIR/log/slurmdbd.log" >&2; die "slurmdbd does not listen on port $((PORT + 2))"; }
    start_slurm_daemon slurmctld
    start_slurm_daemon slurmd
    if ! wait_for "$START_TIMEOUT" idle node_idle; then
        SLURM_CONF=$CONF sinfo -N -l >&2 || true
        tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
        die "node $HOST is not idle after ${START_TIMEOUT} s (logs: $DIR/log)"
    fi
    log "node $HOST idle, partition debug; daemons started in $((SECONDS - t1)) s ($((SECONDS - t0)) s in all)"
    log "use it with: export SLURM_CONF=$CONF"
}

each_env() {  # each_env TEST: pids (not this shell's) whose environment, one entry a line, passes TEST < env
    local p env
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [[ $p == "$$" || $p == "$BASHPID" ]] && continue
        env=$(tr '\0' '\n' 2>/dev/null <"/proc/$p/environ") || continue
        "$1" <<<"$env" && echo "$p"
    done
    return 0
}

of_instance() {  # started by this instance (daemons, job steps), or a process of one of its jobs
    local env
    env=$(cat)
    grep -qxF "$MARK" <<<"$env" || { grep -qxF "SLURM_CONF=$CONF" <<<"$env" && grep -q '^SLURM_JOB_ID=' <<<"$env"; }
}

of_any_instance() { grep -q '^PATCHSCAN_SLURM_INSTANCE='; }

instance_pids() { each_env of_instance; }

cmd_stop() {
    [[ -d $DIR ]] || { log "nothing to stop ($DIR does not exist)"; return 0; }
    if pid_of slurmctld >/dev/null; then  # cancel this cluster's jobs first, so slurmd ends their steps
        local jobs
        jobs=$(SLURM_CONF=$CONF timeout 10 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ') || true
        if [[ -n ${jobs// } ]]; then
            log "cancelling jobs $jobs"
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF timeout 10 scancel $jobs 2>/dev/null || true
            wait_for 15 jobs-gone bash -c "[[ -z \$(SLURM_CONF=$CONF squeue -h 2>/dev/null) ]]" || true
        fi
    fi
    local name pid
    for name in "${DAEMONS[@]}"; do
        pid=$(pid_of "$name") || continue
        kill -TERM "$pid" 2>/dev/null || true
        wait_for 20 "$name-exit" gone "$pid" || kill -KILL "$pid" 2>/dev/null || true
        rm -f "$DIR/run/$name.pid"
    done
    local left
    left=$(instance_pids | tr '\n' ' ')
    if [[ -n ${left// } ]]; then
        log "killing what is left of this instance: $left"
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null || true
    fi
    sleep 0.2
    left=$(instance_pids | tr '\n' ' ')
    [[ -z ${left// } ]] || die "processes still running: $left"
    stop_munge_if_last
    log "stopped; nothing of $DIR is running"
}

stop_munge_if_last() {  # the munged that some instance started, once no instance has daemons left
    local pid others
    pid=$(tr -dc 0-9 2>/dev/null </run/munge/munged.pid) || return 0
    [[ -n $pid ]] && alive "$pid" || return 0
    tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qxF "$MUNGE_MARK" || return 0  # not ours
    others=$(each_env of_any_instance | tr '\n' ' ')
    if [[ -n ${others// } ]]; then
        log "munged stays: another instance still runs (pids $others)"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    wait_for 10 munged-exit gone "$pid" || kill -KILL "$pid" 2>/dev/null || true
}

cmd_status() {
    local name pid rc=0
    munge -n >/dev/null 2>&1 && echo "munged: running" || { echo "munged: not running"; rc=1; }
    for name in mariadb slurmdbd slurmctld slurmd; do
        if pid=$(pid_of "$name"); then echo "$name: running (pid $pid)"; else echo "$name: not running"; rc=1; fi
    done
    ((rc)) || SLURM_CONF=$CONF sinfo
    return $rc
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop; cmd_start ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|restart|status|env   (state: \$PATCHSCAN_SLURM_DIR=$DIR, port \$PATCHSCAN_SLURM_PORT=$PORT)" >&2
       exit 2 ;;
esac
