#!/usr/bin/env bash
# A real one-host Slurm cluster with two emulated nodes (c1, c2), for tests and CI.
#
#   tools/slurm-local.sh start    install (if missing) + start munged, slurmctld, slurmd c1/c2; wait idle
#   tools/slurm-local.sh stop     stop the daemons this script started (by recorded PID)
#   tools/slurm-local.sh status   sinfo / squeue
#   tools/slurm-local.sh restart  stop + start
#
# Debian 12 ships Slurm 22.05 (built with multiple-slurmd support, so one host can run several
# slurmd processes, one per emulated node, each on its own port). No systemd is needed: every daemon
# is started directly and its PID file lives under $LSM_SLURM_DIR (default /run/lsm-slurm).
# That state directory is private: root's, mode 0700, created with a plain `mkdir` (which fails
# rather than reuse what someone else created) and refused if it is a symlink or owned by another
# user; nothing in it is group- or world-writable. Nothing is written to predictable names in /tmp.
#
# There is no accounting database (accounting_storage/none), so the real `sacct` fails. submitit
# polls job states with `sacct -o JobID,State,NodeList --parsable2 -j ID ...`, so a stand-in is
# installed at /usr/local/bin/sacct that answers from `squeue --states=all` (+ `scontrol show job`
# for exit codes) and keeps a small cache (root's, 0600, in the state directory) so finished jobs
# stay answerable after squeue forgets them; other users' calls answer from squeue alone.
#
# Idempotent: `start` on a running cluster only checks it (and restarts it if slurm.conf changed).
# Needs root (re-executes itself through sudo when available).
set -euo pipefail

STATE_DIR=${LSM_SLURM_DIR:-/run/lsm-slurm}
LEGACY_STATE_DIR=/tmp/lsm-slurm  # where older versions kept their state (stopped by `stop`)
SLURM_CONF_FILE=/etc/slurm/slurm.conf
MUNGE_KEY=/etc/munge/munge.key
SACCT_STANDIN=/usr/local/bin/sacct
SACCT_CACHE=$STATE_DIR/sacct-cache
NODES=(c1 c2)
WAIT_TIMEOUT_S=${LSM_SLURM_WAIT_S:-60}
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { printf '[slurm-local] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

make_private_dir() {  # make_private_dir DIR: root's, 0700, never a symlink or someone else's
  local d=$1
  [[ $d =~ ^/[A-Za-z0-9._/-]+$ ]] || die "state directory '$d' must be an absolute path of letters, digits, . _ - /"
  [[ -L $d ]] && die "$d is a symbolic link; refusing to use it as Slurm's state directory"
  if [[ ! -e $d ]]; then
    mkdir -p -- "$(dirname -- "$d")"
    mkdir -m 0700 -- "$d" || die "cannot create $d (did someone else create it meanwhile?)"
  fi
  [[ -d $d && ! -L $d ]] || die "$d is not a directory"
  [[ $(stat -c %u -- "$d") == 0 ]] || die "$d is not owned by root; refusing to use it (remove it or set LSM_SLURM_DIR)"
  chmod 0700 -- "$d"
}

need_root() {
  if [[ $EUID -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
      exec sudo -E -- bash "$0" "$@"
    fi
    die "must run as root (or with sudo available)"
  fi
}

# ---------------------------------------------------------------------------------------------
# PID helpers: only ever signal a PID read from our own PID files, and only if its command name
# matches the daemon we expect (guards against PID reuse after a reboot/container restart).
# ---------------------------------------------------------------------------------------------
pid_alive() {  # pid_alive PIDFILE NAME -> prints pid, rc 0 if running
  local pidfile=$1 name=$2 pid comm
  [[ -r $pidfile ]] || return 1
  pid=$(tr -dc '0-9' <"$pidfile")
  [[ -n $pid ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
  [[ $comm == "$name" ]] || return 1
  echo "$pid"
}

stop_pidfiles() {  # stop_pidfiles NAME PIDFILE...: SIGTERM all at once, wait, SIGKILL stragglers
  local name=$1 pidfile pid i alive
  shift
  local -a pids=()
  for pidfile in "$@"; do
    if pid=$(pid_alive "$pidfile" "$name"); then
      log "stopping $name (pid $pid, $(basename "$pidfile"))"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  for ((i = 0; i < 150 && ${#pids[@]} > 0; i++)); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      log "$name (pid $pid) did not exit after 15 s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  rm -f "$@"
}

# ---------------------------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------------------------
have_binaries() {
  local b
  for b in slurmctld slurmd sinfo squeue sbatch srun scontrol munged munge unmunge; do
    command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || return 1
  done
}

install_packages() {
  if have_binaries; then
    return 0
  fi
  local t0=$SECONDS
  log "installing ${PACKAGES[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q "${PACKAGES[@]}" >"$STATE_DIR/apt.log" 2>&1; then
    log "apt-get install failed; running apt-get update and retrying"
    apt-get update -q >>"$STATE_DIR/apt.log" 2>&1 || true
    apt-get install -y -q "${PACKAGES[@]}" >>"$STATE_DIR/apt.log" 2>&1 ||
      { tail -n 30 "$STATE_DIR/apt.log" >&2; die "apt-get install ${PACKAGES[*]} failed"; }
  fi
  have_binaries || die "packages installed but slurm/munge binaries are missing"
  log "installed in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------------------------------------
# munge
# ---------------------------------------------------------------------------------------------
munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0700 /etc/munge
  if [[ ! -s $MUNGE_KEY ]]; then
    log "creating munge key $MUNGE_KEY"
    if command -v mungekey >/dev/null 2>&1; then
      rm -f "$MUNGE_KEY"
      runuser -u munge -- mungekey --create --keyfile="$MUNGE_KEY"
    else
      dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
    fi
  fi
  chown munge:munge "$MUNGE_KEY"
  chmod 0400 "$MUNGE_KEY"

  if munge_works; then
    return 0  # already running (ours or the system's)
  fi
  # stale socket/pid from a dead munged make it refuse to start
  if ! pid_alive /run/munge/munged.pid munged >/dev/null; then
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  fi
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
  local i
  for ((i = 0; i < 50; i++)); do
    munge_works && break
    sleep 0.1
  done
  munge_works || { tail -n 20 /var/log/munge/munged.log >&2 || true; die "munged does not answer"; }
  cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
}

# ---------------------------------------------------------------------------------------------
# slurm.conf
# ---------------------------------------------------------------------------------------------
render_conf() {
  local host
  host=$(hostname -s)
  cat <<EOF
# Generated by tools/slurm-local.sh -- one-host cluster, two emulated nodes (c1, c2). Do not edit.
ClusterName=lsm
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (slurmd keeps the old
# credential revoked that long; starting it earlier fails with "Job credential revoked"):
# 30 s instead of 120 s keeps the requeue tests short
AuthInfo=cred_expire=30
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# schedule batch jobs at submit time (default batch_sched_delay=3 adds up to 3 s per job)
# and run the periodic passes often (defaults 60 s / 30 s): a requeued job whose StartTime is
# moved to now is only picked up by them
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=5,bf_interval=5
# the emulated nodes are the same host: trust slurm.conf, not the hardware probe
SlurmdParameters=config_overrides
ReturnToService=2
# do not push the submitter's rlimits into jobs (some sandboxes refuse setrlimit)
PropagateResourceLimits=NONE
MailProg=/bin/true
# requeue + preemption-signal tests
JobRequeue=1
KillWait=30
# keep finished jobs visible to squeue/scontrol for 10 min (the sacct stand-in reads them)
MinJobAge=600
SlurmdTimeout=30
InactiveLimit=0
MessageTimeout=10
StateSaveLocation=${STATE_DIR}/state
SlurmdSpoolDir=${STATE_DIR}/spool-%n
SlurmctldPidFile=${STATE_DIR}/slurmctld.pid
SlurmdPidFile=${STATE_DIR}/slurmd-%n.pid
SlurmctldLogFile=${STATE_DIR}/slurmctld.log
SlurmdLogFile=${STATE_DIR}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=c[1-2] NodeHostname=${host} NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=c[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
}

ensure_hosts() {
  if ! grep -Eq '^[[:space:]]*127\.0\.0\.1([[:space:]].*)?[[:space:]]c1([[:space:]]|$)' /etc/hosts ||
    ! grep -Eq '^[[:space:]]*127\.0\.0\.1([[:space:]].*)?[[:space:]]c2([[:space:]]|$)' /etc/hosts; then
    log "adding '127.0.0.1 c1 c2' to /etc/hosts"
    printf '127.0.0.1 c1 c2\n' >>/etc/hosts
  fi
}

# ---------------------------------------------------------------------------------------------
# sacct stand-in
# ---------------------------------------------------------------------------------------------
write_sacct_standin() {
  cat <<'STANDIN'
#!/usr/bin/env bash
# lsm-slurm sacct stand-in -- installed by tools/slurm-local.sh because this cluster has no
# accounting database (AccountingStorageType=accounting_storage/none), so the real sacct fails.
# Answers sacct-style queries (e.g. submitit's `sacct -o JobID,State,NodeList --parsable2 -j ID`)
# from `squeue -h --states=all` and `scontrol show job -o` (exit codes). Finished jobs are cached
# (root's calls update the cache; others read squeue only) so they stay answerable after
# slurmctld forgets them (MinJobAge).
# Supported: -j/--jobs, -o/--format, -p/--parsable, -P/--parsable2, -n/--noheader,
# -s/--state, --delimiter; other sacct options are accepted and ignored (-X, -a, -S, -E, -u, ...).
set -uo pipefail
CACHE=@SACCT_CACHE@  # root's, 0600, in slurm-local's private state directory
SQUEUE=${LSM_SACCT_SQUEUE:-squeue}
SCONTROL=${LSM_SACCT_SCONTROL:-scontrol}

fields="JobID,JobName,Partition,Account,AllocCPUS,State,ExitCode"
parsable=0 header=1 delim="|" jobs="" states=""
flag() {  # one short flag without argument; rc 1 if unknown
  case $1 in
    n) header=0 ;; p) parsable=1 ;; P) parsable=2 ;;
    X | a | L | D | b | l | B | c | e | v | x) ;;  # accepted, no effect
    *) return 1 ;;
  esac
}
while (($#)); do
  a=$1
  case $a in
    -o | --format | --fields) fields=${2-}; shift ;;
    --format=* | --fields=*) fields=${a#*=} ;;
    -o?*) fields=${a#-o} ;;
    -j | --jobs) jobs="$jobs,${2-}"; shift ;;
    --jobs=*) jobs="$jobs,${a#*=}" ;;
    -j?*) jobs="$jobs,${a#-j}" ;;
    -s | --state) states="$states,${2-}"; shift ;;
    --state=*) states="$states,${a#*=}" ;;
    --delimiter) delim=${2-}; shift ;;
    --delimiter=*) delim=${a#*=} ;;
    -p | --parsable) parsable=1 ;;
    -P | --parsable2) parsable=2 ;;
    -n | --noheader) header=0 ;;
    -h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -V | --version) echo "slurm 22.05 (lsm sacct stand-in)"; exit 0 ;;
    -S | -E | -u | -A | -M | -r | -N | -k | -K | -q | -W | -i | -I | -T | -C | -g | -F | \
      --starttime | --endtime | --user | --uid | --account | --accounts | --cluster | --clusters | \
      --partition | --nodelist | --name | --qos | --timelimit-min | --timelimit-max | --wckeys | \
      --group | --gid | --constraints | --flags | --reason | --units) shift ;;
    --*) ;;  # --long-option=value or unknown long flag: ignore
    -?*)
      s=${a#-}
      while [[ -n $s ]] && flag "${s:0:1}"; do s=${s:1}; done
      [[ -z $s ]] || { echo "sacct (lsm stand-in): unsupported option $a, ignored" >&2; }
      ;;
    *) ;;
  esac
  shift
done

# record: rawid|jobid|arrayjob|arraytask|state|nodes|partition|user|cpus|nnodes|elapsed|start|end|reason|exitcode|name
FMT='%A|%i|%F|%K|%T|%N|%P|%u|%C|%D|%M|%S|%e|%r|%j'
tmpd=$(mktemp -d "${TMPDIR:-/tmp}/lsm-sacct.XXXXXX") || exit 1
trap 'rm -rf "$tmpd"' EXIT
live_ok=1
# a job that just ended is briefly COMPLETING (sbatch --wait already returns then); sacct would
# report its final state, so give slurmctld up to ~2 s to finish it before answering
for _ in 1 2 3 4 5 6 7 8; do
  "$SQUEUE" -h --states=all -o "$FMT" >"$tmpd/squeue" 2>"$tmpd/err" || { live_ok=0; break; }
  grep -q '|COMPLETING|' "$tmpd/squeue" || break
  sleep 0.25
done
"$SCONTROL" show job -o >"$tmpd/scontrol" 2>/dev/null || : >"$tmpd/scontrol"
[[ $live_ok == 1 ]] || { echo "sacct (lsm stand-in): squeue failed, answering from cache: $(head -c 300 "$tmpd/err")" >&2; : >"$tmpd/squeue"; }

# live records (exit code joined in from scontrol)
awk -F'|' -v OFS='|' '
  FNR == NR {
    id = ""; ec = ""
    if (match($0, /(^| )JobId=[^ ]+/)) { id = substr($0, RSTART, RLENGTH); sub(/.*JobId=/, "", id) }
    if (match($0, / ExitCode=[^ ]+/)) { ec = substr($0, RSTART + 10, RLENGTH - 10) }
    if (id != "") exitc[id] = ec
    next
  }
  {
    name = $15; for (i = 16; i <= NF; i++) name = name "|" $i   # job names may contain "|"
    gsub(/\|/, "_", name)
    ec = ($1 in exitc) ? exitc[$1] : ""
    print $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, ec, name
  }' "$tmpd/scontrol" "$tmpd/squeue" >"$tmpd/live"

# merge with the cache of finished jobs (under a lock); only its owner (root) can write it
if [[ ! -e $CACHE && -d $(dirname "$CACHE") && -w $(dirname "$CACHE") ]]; then (umask 077; : >>"$CACHE") 2>/dev/null; fi
merge() {
  awk -F'|' -v OFS='|' -v cachenew="$tmpd/cache.new" '
    BEGIN { n = split("COMPLETED FAILED CANCELLED TIMEOUT NODE_FAIL PREEMPTED OUT_OF_MEMORY BOOT_FAIL DEADLINE", t, " ")
            for (i = 1; i <= n; i++) term[t[i]] = 1 }
    FNR == NR { if ($1 != "") { cache[$1] = $0; corder[++nc] = $1 }; next }   # cache file
    { live[$1] = 1; print; if ($5 in term) cache[$1] = $0 }
    END {
      for (i = 1; i <= nc; i++) { id = corder[i]; if (!(id in live) && !(id in done)) { print cache[id]; done[id] = 1 } }
      for (id in cache) keep[id] = 1
      # rewrite cache: terminal records only, keyed by raw id, bounded size
      m = 0; for (id in keep) { split(cache[id], f, "|"); if (f[5] in term) ids[++m] = id + 0 }
      # simple sort (numeric) so that we can keep the newest 5000
      for (i = 2; i <= m; i++) { v = ids[i]; j = i - 1; while (j > 0 && ids[j] > v) { ids[j + 1] = ids[j]; j-- } ids[j + 1] = v }
      start = (m > 5000) ? m - 4999 : 1
      for (i = start; i <= m; i++) print cache[ids[i] ""] > cachenew
      close(cachenew)
    }' "$1" "$tmpd/live"
}
if [[ -w $CACHE ]] && exec 9<>"$CACHE" && flock -w 10 9; then
  : >"$tmpd/cache.new"
  merge "$CACHE" >"$tmpd/all"
  cat "$tmpd/cache.new" >"$CACHE"
  flock -u 9
else
  : >"$tmpd/cache.new"
  { [[ -r $CACHE ]] && merge "$CACHE" >"$tmpd/all" 2>/dev/null; } || merge /dev/null >"$tmpd/all"
fi

# select + format
awk -F'|' -v fields="$fields" -v jobs="$jobs" -v states="$states" -v parsable="$parsable" \
  -v header="$header" -v delim="$delim" '
  function upper(s) { return toupper(s) }
  BEGIN {
    nf = split(fields, F, ",")
    for (i = 1; i <= nf; i++) { sub(/%.*/, "", F[i]); name[i] = F[i]; key[i] = tolower(F[i]) }
    nj = 0; n = split(jobs, J, ",")
    for (i = 1; i <= n; i++) if (J[i] != "") { j = J[i]; sub(/\..*/, "", j); want[j] = 1; nj++ }
    ns = 0; n = split(states, S, ",")
    short["PD"] = "PENDING"; short["R"] = "RUNNING"; short["CD"] = "COMPLETED"; short["F"] = "FAILED"
    short["CA"] = "CANCELLED"; short["TO"] = "TIMEOUT"; short["NF"] = "NODE_FAIL"; short["PR"] = "PREEMPTED"
    short["OOM"] = "OUT_OF_MEMORY"; short["BF"] = "BOOT_FAIL"; short["DL"] = "DEADLINE"; short["RQ"] = "REQUEUED"
    short["CG"] = "COMPLETING"; short["S"] = "SUSPENDED"; short["RS"] = "RESIZING"; short["RV"] = "REVOKED"
    for (i = 1; i <= n; i++) if (S[i] != "") { s = upper(S[i]); if (s in short) s = short[s]; wstate[s] = 1; ns++ }
    rows = 0
  }
  {
    raw = $1; jid = $2; arr = $3; task = $4
    if (nj > 0 && !((raw in want) || (jid in want) || (arr in want) || ((arr "_" task) in want))) next
    st = $5
    # still COMPLETING: sacct shows the final state; derive it from the exit code
    if (st == "COMPLETING") { split($15, ec, ":"); st = ($15 == "" ) ? "RUNNING" : (ec[1] == "0" && ec[2] == "0") ? "COMPLETED" : (ec[2] != "0" && ec[2] != "") ? "CANCELLED" : "FAILED" }
    if (ns > 0 && !(st in wstate)) next
    for (i = 1; i <= nf; i++) {
      k = key[i]; v = ""
      if (k == "jobid") v = jid
      else if (k == "jobidraw") v = raw
      else if (k == "state") v = st
      else if (k == "nodelist") v = ($6 == "" || $6 == "(null)") ? "None assigned" : $6
      else if (k == "partition") v = $7
      else if (k == "user") v = $8
      else if (k == "alloccpus" || k == "ncpus" || k == "reqcpus") v = $9
      else if (k == "allocnodes" || k == "nnodes") v = $10
      else if (k == "elapsed") v = $11
      else if (k == "start") v = $12
      else if (k == "end") v = $13
      else if (k == "reason") v = $14
      else if (k == "exitcode" || k == "derivedexitcode") v = ($15 != "") ? $15 : ((st == "COMPLETED") ? "0:0" : "")
      else if (k == "jobname") v = $16
      else if (k == "arrayjobid") v = arr
      else if (k == "arraytaskid") v = (task == "N/A") ? "" : task
      val[rows, i] = v
      if (length(v) > width[i]) width[i] = length(v)
    }
    rows++
  }
  END {
    for (i = 1; i <= nf; i++) { if (width[i] < 10) width[i] = 10; if (length(name[i]) > width[i]) width[i] = length(name[i]) }
    if (header) {
      line = ""
      for (i = 1; i <= nf; i++) {
        if (parsable) line = line (i > 1 ? delim : "") name[i]
        else line = line (i > 1 ? " " : "") sprintf("%" width[i] "s", name[i])
      }
      if (parsable == 1) line = line delim
      print line
      if (!parsable) {
        line = ""; for (i = 1; i <= nf; i++) { d = ""; for (c = 0; c < width[i]; c++) d = d "-"; line = line (i > 1 ? " " : "") d }
        print line
      }
    }
    for (r = 0; r < rows; r++) {
      line = ""
      for (i = 1; i <= nf; i++) {
        if (parsable) line = line (i > 1 ? delim : "") val[r, i]
        else line = line (i > 1 ? " " : "") sprintf("%" width[i] "s", substr(val[r, i], 1, width[i]))
      }
      if (parsable == 1) line = line delim
      print line
    }
  }' <(sort -t'|' -k3,3n -k4,4n -k1,1n "$tmpd/all")
STANDIN
}

ensure_sacct() {
  # keep a real, working sacct (e.g. a cluster with slurmdbd) untouched
  if [[ -e $SACCT_STANDIN ]] && ! grep -q 'lsm-slurm sacct stand-in' "$SACCT_STANDIN" 2>/dev/null; then
    log "$SACCT_STANDIN exists and is not ours; leaving it alone"
    return 0
  fi
  if [[ -x /usr/bin/sacct ]] && /usr/bin/sacct -n -X -j 1 >/dev/null 2>&1; then
    log "real sacct works; not installing the stand-in"
    [[ -e $SACCT_STANDIN ]] && rm -f "$SACCT_STANDIN"
    return 0
  fi
  local tmp
  tmp=$(mktemp "$SACCT_STANDIN.XXXXXX")
  write_sacct_standin | sed "s|@SACCT_CACHE@|$SACCT_CACHE|" >"$tmp"
  chmod 0755 "$tmp"
  mv -f "$tmp" "$SACCT_STANDIN"
  if [[ -L $SACCT_CACHE ]]; then rm -f "$SACCT_CACHE"; fi
  if [[ ! -e $SACCT_CACHE ]]; then
    (umask 077 && : >"$SACCT_CACHE")
  fi
  chown root:root "$SACCT_CACHE"
  chmod 0600 "$SACCT_CACHE"
}

# ---------------------------------------------------------------------------------------------
# start / stop / status
# ---------------------------------------------------------------------------------------------
show_diagnostics() {
  {
    echo "===== sinfo"; sinfo -N -l 2>&1 || true
    echo "===== scontrol show node"; scontrol show node 2>&1 || true
    echo "===== scontrol ping"; scontrol ping 2>&1 || true
    echo "===== processes"; pgrep -a 'slurm|munge' || true
    echo "===== $STATE_DIR/slurmctld.log (tail)"; tail -n 60 "$STATE_DIR/slurmctld.log" 2>&1 || true
    local n
    for n in "${NODES[@]}"; do
      echo "===== $STATE_DIR/slurmd-$n.log (tail)"; tail -n 40 "$STATE_DIR/slurmd-$n.log" 2>&1 || true
    done
  } >&2
}

wait_idle() {
  local deadline=$((SECONDS + WAIT_TIMEOUT_S)) out resumed=0 n ok
  while ((SECONDS < deadline)); do
    out=$(sinfo -h -N -o '%N %t' 2>/dev/null || true)
    ok=1
    for n in "${NODES[@]}"; do
      # idle (or busy with jobs when start is re-run on a live cluster)
      grep -Eq "^$n (idle|mix|alloc|comp)\$" <<<"$out" || ok=0
    done
    if ((ok)); then
      return 0
    fi
    # nodes left DOWN/DRAINED by an earlier run: bring them back once
    if ((!resumed)) && grep -Eq ' (down|drain|drng|drained|fail)\*?$' <<<"$out"; then
      scontrol update nodename=c[1-2] state=resume >/dev/null 2>&1 || true
      resumed=1
    fi
    sleep 0.5
  done
  log "nodes not idle after ${WAIT_TIMEOUT_S} s; sinfo says:"
  printf '%s\n' "$out" >&2
  show_diagnostics
  return 1
}

stop_slurm_daemons() {
  local n d
  local -a dirs=("$STATE_DIR") files
  # daemons started by an older version of this script keep their PID files in /tmp: read them
  # only from a root-owned directory (pid_alive also checks the process name)
  if [[ -d $LEGACY_STATE_DIR && ! -L $LEGACY_STATE_DIR && $(stat -c %u -- "$LEGACY_STATE_DIR") == 0 ]]; then
    dirs+=("$LEGACY_STATE_DIR")
  fi
  for d in "${dirs[@]}"; do
    files=()
    for n in "${NODES[@]}"; do files+=("$d/slurmd-$n.pid"); done
    stop_pidfiles slurmd "${files[@]}"
    stop_pidfiles slurmctld "$d/slurmctld.pid"
  done
}

cmd_start() {
  local t0=$SECONDS changed=0 n
  make_private_dir "$STATE_DIR"
  install -d -m 0700 "$STATE_DIR/state"
  install_packages
  ensure_hosts
  start_munge

  install -d -m 0755 /etc/slurm
  local new
  new=$(render_conf)
  if [[ ! -f $SLURM_CONF_FILE ]] || [[ $new != "$(cat "$SLURM_CONF_FILE")" ]]; then
    printf '%s\n' "$new" >"$SLURM_CONF_FILE"
    chmod 0644 "$SLURM_CONF_FILE"
    changed=1
    log "wrote $SLURM_CONF_FILE"
  fi
  if ((changed)); then
    stop_slurm_daemons  # running daemons use the old config
  fi

  if pid_alive "$STATE_DIR/slurmctld.pid" slurmctld >/dev/null; then
    log "slurmctld already running"
  else
    log "starting slurmctld -c (fresh state)"
    rm -f "$SACCT_CACHE"  # job ids restart at 1 with a fresh state
    rm -f "$STATE_DIR/slurmctld.pid"
    slurmctld -c -f "$SLURM_CONF_FILE" || { show_diagnostics; die "slurmctld failed to start"; }
  fi
  for n in "${NODES[@]}"; do
    if pid_alive "$STATE_DIR/slurmd-$n.pid" slurmd >/dev/null; then
      log "slurmd $n already running"
    else
      install -d -m 0700 "$STATE_DIR/spool-$n"
      log "starting slurmd -N $n"
      slurmd -N "$n" -f "$SLURM_CONF_FILE" || { show_diagnostics; die "slurmd -N $n failed to start"; }
    fi
  done
  ensure_sacct
  wait_idle || die "cluster did not come up"
  log "cluster up in $((SECONDS - t0)) s"
  sinfo
}

cmd_stop() {
  stop_slurm_daemons
  stop_pidfiles munged "$STATE_DIR/munged.pid"
  if [[ -d $LEGACY_STATE_DIR && ! -L $LEGACY_STATE_DIR && $(stat -c %u -- "$LEGACY_STATE_DIR") == 0 ]]; then
    stop_pidfiles munged "$LEGACY_STATE_DIR/munged.pid"
  fi
  log "stopped (packages left installed)"
}

cmd_status() {
  local n pid rc=0
  if [[ ! -r $STATE_DIR ]]; then
    echo "($STATE_DIR is root's: run as root to see the daemons' PIDs)"
  fi
  if pid=$(pid_alive "$STATE_DIR/slurmctld.pid" slurmctld); then
    echo "slurmctld: running (pid $pid)"
  else
    echo "slurmctld: not running"; rc=1
  fi
  for n in "${NODES[@]}"; do
    if pid=$(pid_alive "$STATE_DIR/slurmd-$n.pid" slurmd); then
      echo "slurmd $n: running (pid $pid)"
    else
      echo "slurmd $n: not running"; rc=1
    fi
  done
  if command -v sinfo >/dev/null 2>&1; then
    echo "===== sinfo"; sinfo 2>&1 || rc=1
    echo "===== squeue"; squeue 2>&1 || rc=1
  fi
  return "$rc"
}

main() {
  local cmd=${1:-}
  case $cmd in
    start) need_root "$@"; cmd_start ;;
    stop) need_root "$@"; cmd_stop ;;
    restart) need_root "$@"; cmd_stop; cmd_start ;;
    status) cmd_status ;;
    *) echo "usage: $0 {start|stop|restart|status}" >&2; exit 2 ;;
  esac
}

main "$@"
